"""mvportrait.evaluation: metrics.

* :mod:`mvportrait.evaluation.motion_analyser`: labels head / jaw pose sequences with the motion
  vocabulary (control accuracy of MotionDM) and the ``jitter`` metric
* :mod:`mvportrait.evaluation.emotion_analyser`: labels expression sequences from landmark
  geometry (control accuracy of EmotionDM) and counts blinks

Submodules are imported on demand.
"""
