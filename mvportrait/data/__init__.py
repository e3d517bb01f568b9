"""mvportrait.data: synthetic corpora.

* :mod:`mvportrait.data.motion`: head / jaw motion clips with labels and captions (MotionDM)
* :mod:`mvportrait.data.emotion`: expression clips with labels and captions (EmotionDM)
* :mod:`mvportrait.data.corpus`: the captioned Text2FLAME corpus with its held-out-wording split

Submodules are imported on demand (``from mvportrait.data.corpus import Text2FlameCorpus``).
"""
