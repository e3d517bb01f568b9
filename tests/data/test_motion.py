"""Procedural head-motion clips: determinism, ranges, smoothness, captions, FLAME sign conventions."""
import re

import numpy as np
import pytest
import torch

from mvportrait.data import motion as M
from mvportrait.data.motion import (AMPLITUDE_DEG, MotionLabel, MotionSegment, caption_motion, make_motion,
                                    motion_phrase, sample_motion)
from mvportrait.flame.params import FlameParams
from mvportrait.flame.synthetic import synthetic_head


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(2024)
    return [sample_motion(rng) for _ in range(300)]


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{\w+\}", template)
    return re.compile(r"\S*".join(re.escape(p) for p in parts))


def test_deterministic_for_a_seed():
    a_label, a = sample_motion(np.random.default_rng(7))
    b_label, b = sample_motion(np.random.default_rng(7))
    c_label, c = sample_motion(np.random.default_rng(8))
    assert a_label == b_label
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["neck_pose"], c["neck_pose"])
    assert caption_motion(a_label, 3) == caption_motion(b_label, 3)
    assert sample_motion(5)[0] == sample_motion(5)[0]  # an int seed works too


def test_shapes_dtypes_and_realistic_ranges(clips):
    for label, poses in clips:
        assert set(poses) == {"global_pose", "neck_pose", "jaw_pose"}
        for v in poses.values():
            assert v.shape == (100, 3) and v.dtype == np.float32 and np.isfinite(v).all()
        assert np.degrees(np.abs(poses["neck_pose"])).max() < 50  # turns up to ~45 deg
        assert np.degrees(np.abs(poses["global_pose"])).max() < 1.5  # body sway only
        jaw = poses["jaw_pose"][:, 0]
        assert jaw.min() >= 0 and jaw.max() < 0.37
        assert label.frames == 100 and 1 <= len(label.segments) <= 2
        for s in label.segments:
            assert 0 <= s.start <= s.end <= 100
        if len(label.segments) == 2:
            assert label.segments[0].end <= label.segments[1].start
    kinds = {s.action for label, _ in clips for s in label.segments}
    assert kinds == set(M.HEAD_ACTIONS)
    assert {label.jaw for label, _ in clips} == set(M.JAW_ACTIONS)


def test_trajectories_are_smooth(clips):
    means = []
    for _, poses in clips:
        acc = np.abs(np.diff(np.degrees(poses["neck_pose"]), 2, axis=0))
        assert acc.max() < 13  # deg / frame^2: a fast, large shake (65 deg in 0.23 s) peaks near 11.3
        means.append(acc.mean())
        jaw_acc = np.abs(np.diff(poses["jaw_pose"][:, 0], 2))
        assert jaw_acc.max() < 0.25  # rad / frame^2 (a 0.18 s syllable of 0.18 rad peaks near 0.18)
    assert np.median(means) < 0.25
    rough = np.degrees(clips[0][1]["neck_pose"]) + np.random.default_rng(0).normal(0, 0.5, (100, 3))
    assert np.abs(np.diff(rough, 2, axis=0)).mean() > 4 * np.median(means)


def test_amplitude_and_speed_classes_are_physical():
    fast = make_motion([{"action": "turn", "direction": "left", "speed": "fast", "amplitude": "large"}], rng=1)[1]
    slow = make_motion([{"action": "turn", "direction": "left", "speed": "slow", "amplitude": "small"}], rng=1)[1]
    yaw_fast, yaw_slow = np.degrees(fast["neck_pose"][:, 1]), np.degrees(slow["neck_pose"][:, 1])
    lo, hi = AMPLITUDE_DEG["turn"]["large"]
    assert lo - 1.5 < yaw_fast[-1] < hi + 1.5
    assert AMPLITUDE_DEG["turn"]["small"][0] - 1.5 < yaw_slow[-1] < AMPLITUDE_DEG["turn"]["small"][1] + 1.5
    assert np.abs(np.diff(yaw_fast)).max() > 4 * np.abs(np.diff(yaw_slow)).max()
    nod = np.degrees(make_motion([{"action": "nod", "count": 3, "speed": "fast"}], rng=2)[1]["neck_pose"][:, 0])
    peaks = [i for i in range(1, 99) if nod[i] > nod[i - 1] and nod[i] >= nod[i + 1] and nod[i] > 8]
    assert len(peaks) == 3


def test_segment_fields_follow_the_vocabulary():
    assert MotionSegment("turn", "left", "slow", None, "large").key() == ("turn", "left", "slow", None, "large")
    with pytest.raises(ValueError, match="direction"):
        MotionSegment("turn", None, "slow", None, "large")
    with pytest.raises(ValueError, match="count"):
        MotionSegment("nod", None, "slow", 5, "large")
    with pytest.raises(ValueError, match="unknown head action"):
        MotionSegment("wave")
    with pytest.raises(ValueError, match="no speed"):
        MotionSegment("still", speed="slow")
    with pytest.raises(ValueError, match="jaw"):
        MotionLabel((MotionSegment("still"),), jaw="yawn")
    with pytest.raises(ValueError, match="1 or 2"):
        MotionLabel(tuple(MotionSegment("nod", None, "slow", 1, "small") for _ in range(3)))
    with pytest.raises(ValueError, match="repeat"):
        MotionLabel((MotionSegment("nod", None, "slow", 1, "small"), MotionSegment("nod", None, "fast", 2, "small")))
    label = sample_motion(11)[0]
    assert MotionLabel.from_dict(label.to_dict()) == label


def test_bad_inputs_raise_clear_errors():
    for frames in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="frames"):
            sample_motion(0, frames=frames)
    with pytest.raises(ValueError, match="fps"):
        sample_motion(0, fps=0)
    with pytest.raises(TypeError, match="rng"):
        sample_motion("seed")
    with pytest.raises(ValueError, match="unknown head action"):
        make_motion([{"action": "wave"}])
    with pytest.raises(ValueError, match="unknown jaw"):
        make_motion([{"action": "still"}], jaw="yawn")
    with pytest.raises(ValueError, match="do not fit"):
        make_motion([{"action": "nod", "count": 3, "speed": "slow"}], frames=50)
    with pytest.raises(ValueError, match="goes past"):
        make_motion([{"action": "look", "direction": "down", "amplitude": "large", "speed": "fast"},
                     {"action": "nod", "amplitude": "large", "speed": "fast"}], frames=200)
    with pytest.raises(ValueError, match="unknown segment fields"):
        make_motion([{"action": "nod", "times": 2}])


def test_short_clips_still_work():
    for frames in (1, 3, 12):
        label, poses = sample_motion(np.random.default_rng(frames), frames=frames)
        assert poses["neck_pose"].shape == (frames, 3)
        assert label.segments[0].action == "still"


def test_captions_match_labels(clips):
    rng = np.random.default_rng(0)
    for label, _ in clips[:150]:
        for split in ("train", "test"):
            text = motion_phrase(label, rng, split)
            assert text and text == text.strip() and "{" not in text and "  " not in text
            for seg in label.segments:
                key = f"look_{seg.direction}" if seg.action == "look" else seg.action
                assert any(_template_regex(t.replace("{dir}", seg.direction or "")).search(text)
                           for t in M.VERBS[key].items(split)), (seg, text)
                if seg.direction in ("left", "right"):
                    assert seg.direction in text
                if seg.speed in M.SPEED_WORDS:
                    assert any(w in text for w in M.SPEED_WORDS[seg.speed].items(split)), text
                if seg.count and seg.count > 1:
                    words = M.COUNT_ADVERBS[seg.count].items(split) + M.COUNT_NUMBERS[seg.count].items(split)
                    assert any(w in text for w in words), text
            if label.jaw != "none":
                assert any(_template_regex(t).search(text) for t in M.JAW_PHRASES[label.jaw].items(split)), text


@pytest.fixture(scope="module")
def head():
    return synthetic_head(0).model


def _landmarks(model, poses):
    p = FlameParams(shape=torch.zeros(1, 1), expression=torch.zeros(1, len(poses["neck_pose"]), 10),
                    **{k: torch.as_tensor(v)[None] for k, v in poses.items()})
    return model(p).landmarks[0].numpy()


@pytest.mark.parametrize("spec,check", [
    ({"action": "turn", "direction": "left"}, lambda a, b: b[30, 0] - a[30, 0] > 0.02),    # nose to +x
    ({"action": "turn", "direction": "right"}, lambda a, b: b[30, 0] - a[30, 0] < -0.02),
    ({"action": "tilt", "direction": "left"}, lambda a, b: b[27, 0] - a[27, 0] > 0.01),    # top of face to +x
    ({"action": "tilt", "direction": "right"}, lambda a, b: b[27, 0] - a[27, 0] < -0.01),
    ({"action": "look", "direction": "down"}, lambda a, b: b[30, 1] - a[30, 1] < -0.01),   # nose goes down
    ({"action": "look", "direction": "up"}, lambda a, b: b[30, 1] - a[30, 1] > 0.01),
])
def test_sign_conventions_in_the_flame_forward(head, spec, check):
    _, poses = make_motion([spec], rng=3, frames=50)
    lm = _landmarks(head, poses)
    assert check(lm[0], lm[-1]), spec


def test_nod_goes_down_and_back_and_jaw_opens_mouth(head):
    _, poses = make_motion([{"action": "nod", "count": 1}], jaw="open_wide", rng=4, frames=60)
    lm = _landmarks(head, poses)
    nose_y = lm[:, 30, 1]
    assert nose_y.min() < nose_y[0] - 0.015 and abs(nose_y[-1] - nose_y[0]) < 0.003
    gap = lm[:, 62, 1] - lm[:, 66, 1]
    assert gap[-1] > 0.012 and gap[0] < 0.005
