"""Motion and emotion analysers: they recover the corpus's own labels; jitter; blink counting."""
import numpy as np
import pytest
import torch

from mvportrait.data.emotion import make_emotion, sample_emotion
from mvportrait.data.motion import make_motion, sample_motion
from mvportrait.evaluation import emotion_analyser as EA
from mvportrait.evaluation import motion_analyser as MA


def _accuracy(results):
    keys = results[0].keys()
    return {k: float(np.mean([r[k] for r in results])) for k in keys}


# ------------------------------------------------------------------------------ motion
def test_motion_analyser_recovers_labels_on_fresh_clips():
    rng = np.random.default_rng(987)  # seeds never used to tune the analyser
    results = []
    for _ in range(400):
        label, poses = sample_motion(rng)
        results.append(MA.compare(label, MA.analyse_motion(poses)))
    acc = _accuracy(results)
    assert min(acc.values()) >= 0.97, acc


def test_motion_analyser_tolerates_extra_frame_noise_and_other_rates():
    rng = np.random.default_rng(654)
    results = []
    for i in range(150):
        fps = (25.0, 30.0)[i % 2]
        label, poses = sample_motion(rng, frames=int(4 * fps), fps=fps)
        noisy = {k: v + np.radians(0.15) * rng.standard_normal(v.shape) for k, v in poses.items()}
        noisy["jaw_pose"] = poses["jaw_pose"] + 0.005 * rng.standard_normal(poses["jaw_pose"].shape)
        results.append(MA.compare(label, MA.analyse_motion(noisy, fps)))
    assert _accuracy(results)["all"] >= 0.95


@pytest.mark.parametrize("spec,jaw", [
    ([{"action": "nod", "count": 3, "speed": "fast", "amplitude": "small"}], "talk"),
    ([{"action": "shake", "count": 2, "speed": "slow", "amplitude": "large"}], "none"),
    ([{"action": "turn", "direction": "left", "speed": "slow", "amplitude": "large"},
      {"action": "turn", "direction": "right", "speed": "fast", "amplitude": "small"}], "open_close"),
    ([{"action": "still"}, {"action": "tilt", "direction": "right", "amplitude": "normal"}], "open_wide"),
    ([{"action": "look", "direction": "down", "speed": "fast", "amplitude": "normal"},
      {"action": "nod", "count": 2, "speed": "normal", "amplitude": "small"}], "none"),
    ([{"action": "sway"}], "talk"),
    ([{"action": "still"}], "none"),
])
def test_motion_analyser_named_cases(spec, jaw):
    label, poses = make_motion(spec, jaw, rng=21, frames=125)
    found = MA.analyse_motion({k: torch.as_tensor(v)[None] for k, v in poses.items()})  # torch (1, T, 3) works
    assert [s.key() for s in found.segments] == [s.key() for s in label.segments]
    assert found.jaw == jaw


def test_motion_analyser_is_deterministic_and_validates_input():
    _, poses = sample_motion(np.random.default_rng(3))
    assert MA.analyse_motion(poses) == MA.analyse_motion(dict(poses))
    with pytest.raises(ValueError, match="neck_pose"):
        MA.analyse_motion({"jaw_pose": poses["jaw_pose"]})
    with pytest.raises(ValueError, match=r"\(T, 3\)"):
        MA.analyse_motion({"neck_pose": np.zeros((10, 4))})
    with pytest.raises(ValueError, match="frames"):
        MA.analyse_motion({"neck_pose": np.zeros((10, 3)), "global_pose": np.zeros((9, 3))})
    with pytest.raises(ValueError, match="NaN"):
        MA.analyse_motion({"neck_pose": np.full((10, 3), np.nan)})
    with pytest.raises(ValueError, match="fps"):
        MA.analyse_motion(poses, fps=0)


def test_head_angles_compose_global_and_neck():
    neck = np.zeros((5, 3))
    neck[:, 1] = np.radians(20)
    glob = np.zeros((5, 3))
    glob[:, 1] = np.radians(10)
    ang = MA.head_angles({"neck_pose": neck, "global_pose": glob})
    np.testing.assert_allclose(ang[:, 1], 30.0, atol=1e-6)
    # a body turn alone is still a head turn in world space
    label, poses = make_motion([{"action": "turn", "direction": "left"}], rng=2, frames=60)
    moved = {"neck_pose": np.zeros_like(poses["neck_pose"]), "global_pose": poses["neck_pose"]}
    assert MA.analyse_motion(moved).actions() == (("turn", "left"),)


def test_jitter_metric():
    t = np.arange(50, dtype=np.float64)
    assert MA.jitter(0.5 * t ** 2) == pytest.approx(1.0)  # second difference of t^2 / 2 is 1
    assert MA.jitter(np.stack([t, 2 * t], 1)) == pytest.approx(0.0)
    _, poses = make_motion([{"action": "nod", "count": 2}], rng=5)
    smooth = MA.jitter(poses)
    noisy = MA.jitter({k: v + 0.01 * np.random.default_rng(0).standard_normal(v.shape) for k, v in poses.items()})
    assert noisy > 5 * smooth
    assert MA.jitter(torch.zeros(2, 10, 3)) == 0.0
    with pytest.raises(ValueError, match="3 frames"):
        MA.jitter(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least one"):
        MA.jitter({})


def test_zigzag():
    x = np.array([0, 1, 5, 2, 0, 4, 6, 1, 0.5, 0.0])
    assert MA.zigzag(x, 2.0) == [2, 4, 6]
    assert MA.zigzag(np.zeros(10), 0.1) == []


# ----------------------------------------------------------------------------- emotion
def test_emotion_analyser_recovers_labels_on_fresh_clips():
    rng = np.random.default_rng(4321)
    results = []
    for _ in range(300):
        label, expr = sample_emotion(rng)
        results.append(EA.compare(label, EA.analyse_emotion(expr)))
    acc = _accuracy(results)
    assert acc["emotion"] >= 0.95 and acc["blinks"] >= 0.95, acc
    assert acc["intensity"] >= 0.9 and acc["timing"] >= 0.9, acc


def test_emotion_analyser_other_lengths_and_noise():
    rng = np.random.default_rng(77)
    hits = []
    for i in range(70):
        label, expr = sample_emotion(rng, frames=(60, 150)[i % 2], fps=25.0, n_expr=(50, 100)[i % 2])
        expr = expr + 0.03 * rng.standard_normal(expr.shape)
        hits.append(EA.analyse_emotion(expr).emotion == label.emotion)
    assert np.mean(hits) >= 0.95


@pytest.mark.parametrize("emotion", ["neutral", "happy", "sad", "angry", "surprised", "disgusted", "fearful"])
def test_emotion_analyser_each_emotion_slight(emotion):
    intensity = None if emotion == "neutral" else "slight"
    label, expr = make_emotion(emotion, intensity, "gradual" if intensity else "hold", rng=8)
    found = EA.analyse_emotion(torch.as_tensor(expr))
    assert found.emotion == emotion and found.intensity == intensity
    assert found.blinks == len(label.blinks)


def test_linear_landmarks_equal_the_flame_forward():
    expr = np.random.default_rng(0).normal(0, 0.7, (6, 50))
    fast = EA.expression_landmarks(expr)
    exact = EA.expression_landmarks(expr, exact=True)
    np.testing.assert_allclose(fast, exact, atol=2e-6)


def test_features_measure_what_they_say():
    def feat(**kw):
        from mvportrait.flame.synthetic import EXPRESSION_NAMES
        e = np.zeros((1, 50))
        for k, v in kw.items():
            e[0, EXPRESSION_NAMES.index(k)] = v
        return dict(zip(EA.FEATURES, EA.expression_features(e)[0]))
    assert feat(smile=1)["corner"] > 3 and feat(frown=1)["corner"] < -3
    assert feat(brow_raise=1)["brow_out"] > 2 and feat(brow_inner_raise=1)["brow_in"] > 2
    assert feat(brow_furrow=1)["brow_gap"] < -2 and feat(eyes_wide=1)["eye"] > 2
    assert feat(lips_part=1)["open"] > 2 and feat(upper_lip_raise=1)["nose_lip"] < -2
    assert all(abs(v) < 1e-9 for v in feat().values())


def test_committed_parameters_match_a_refit():
    fit = EA.fit_parameters(seed=123, n=25, frames=25)
    for emo, proto in EA.PROTOTYPES.items():
        cos = proto @ fit["PROTOTYPES"][emo] / np.linalg.norm(proto) / np.linalg.norm(fit["PROTOTYPES"][emo])
        assert cos > 0.99, emo
        assert np.linalg.norm(fit["PROTOTYPES"][emo]) == pytest.approx(np.linalg.norm(proto), rel=0.1)
    np.testing.assert_allclose(fit["FEATURE_SCALE"], EA.FEATURE_SCALE, rtol=0.6)


def test_blink_counter():
    rng = np.random.default_rng(5)
    for _ in range(10):
        label, expr = make_emotion("surprised", "strong", "brief", rng, frames=250)
        assert EA.count_blinks(expr) == len(label.blinks)
    _, no_blinks = make_emotion("happy", "strong", "sudden", rng, frames=250, blinks=False)
    assert EA.count_blinks(no_blinks) == 0
    with pytest.raises(ValueError, match="expression sequence or landmarks"):
        EA.count_blinks()


def test_emotion_analyser_validates_input():
    with pytest.raises(ValueError, match=r"\(T, n_expr\)"):
        EA.analyse_emotion(np.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        EA.analyse_emotion(np.full((5, 50), np.nan))
    with pytest.raises(ValueError, match="coefficients"):
        EA.analyse_emotion(np.zeros((5, 120)))
    with pytest.raises(ValueError, match="fps"):
        EA.analyse_emotion(np.zeros((5, 50)), fps=-1)
    a = EA.analyse_emotion(np.zeros((5, 50)))
    assert a.emotion == "neutral" and a.intensity is None and a.blinks == 0
