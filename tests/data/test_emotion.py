"""Procedural expression clips: determinism, recipes, timing envelopes, blinks, captions."""
import re

import numpy as np
import pytest

from mvportrait.data import emotion as E
from mvportrait.data.emotion import EmotionLabel, caption_emotion, emotion_phrase, make_emotion, sample_emotion
from mvportrait.flame.synthetic import EXPRESSION_NAMES

IDX = {n: i for i, n in enumerate(EXPRESSION_NAMES)}


def _rx(template: str) -> re.Pattern:
    return re.compile(r".*".join(re.escape(p) for p in re.split(r"\{\w+\}", template)))


def test_deterministic_for_a_seed():
    a_label, a = sample_emotion(np.random.default_rng(4))
    b_label, b = sample_emotion(np.random.default_rng(4))
    _, c = sample_emotion(np.random.default_rng(5))
    assert a_label == b_label
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert caption_emotion(a_label, 9) == caption_emotion(b_label, 9)


@pytest.mark.parametrize("n_expr", [15, 50, 100])
def test_shapes_and_component_count(n_expr):
    label, expr = sample_emotion(np.random.default_rng(n_expr), frames=60, fps=30.0, n_expr=n_expr)
    assert expr.shape == (60, n_expr) and expr.dtype == np.float32 and np.isfinite(expr).all()
    assert label.frames == 60 and label.fps == 30.0


def test_recipes_intensity_and_noise():
    rng = np.random.default_rng(0)
    for emotion, recipe in E.RECIPES.items():
        for intensity in (("slight", "moderate", "strong") if emotion != "neutral" else (None,)):
            label, expr = make_emotion(emotion, intensity, "hold", rng, blinks=False)
            mean = expr.mean(0)
            lo, hi = E.INTENSITY_SCALE[intensity] if intensity else (0, 0)
            for name, w in recipe.items():
                assert lo * w * 0.8 - 0.1 < mean[IDX[name]] < hi * w * 1.2 + 0.1, (emotion, name)
            others = [i for n, i in IDX.items() if n not in recipe]
            assert np.abs(mean[others]).max() < 0.2  # only small noise elsewhere
            assert np.abs(expr[:, 15:]).max() < 1.5


def test_timing_envelopes():
    rng = np.random.default_rng(1)
    smile = IDX["smile"]
    for timing in E.TIMINGS:
        label, expr = make_emotion("happy", "strong", timing, rng, frames=100, blinks=False)
        s = expr[:, smile]
        peak = s[label.apex_start:label.apex_end].mean()
        assert peak > 1.4
        assert label.onset <= label.apex_start <= label.apex_end <= label.offset <= 100
        if timing == "hold":
            assert s[:5].mean() > 0.8 * peak
        else:
            assert abs(s[:max(1, label.onset)].mean()) < 0.2 * peak
        if timing == "gradual":
            assert (label.apex_start - label.onset) / 25 >= 1.4
        if timing == "sudden":
            assert (label.apex_start - label.onset) / 25 <= 0.3
        if timing == "brief":
            assert label.offset < 100 and abs(s[label.offset:].mean()) < 0.2 * peak


def test_blinks_are_short_pulses_every_two_to_six_seconds():
    rng = np.random.default_rng(2)
    for _ in range(20):
        label, expr = make_emotion("neutral", rng=rng, frames=300, fps=25.0)
        closed = (expr[:, IDX["eye_close_left"]] > 0.5) & (expr[:, IDX["eye_close_right"]] > 0.5)
        runs = np.flatnonzero(np.diff(closed.astype(int)) == 1)
        assert len(runs) == len(label.blinks) >= 1
        for c in label.blinks:
            assert expr[c, IDX["eye_close_left"]] > 0.7  # closes to >= 0.95, minus the small noise
        assert closed.sum() / len(label.blinks) <= 0.3 * 25 * 0.75  # each under ~300 ms at half closure
        if len(label.blinks) > 1:
            assert np.diff(label.blinks).min() >= 2.0 * 25
            assert np.diff(label.blinks).max() <= 6.4 * 25
    _, still = make_emotion("neutral", rng=rng, blinks=False)
    assert still[:, IDX["eye_close_left"]].max() < 0.3


def test_captions_match_labels():
    rng = np.random.default_rng(3)
    for _ in range(200):
        label, _ = sample_emotion(rng)
        for split in ("train", "test"):
            text = emotion_phrase(label, rng, split)
            assert text and "{" not in text and "  " not in text and text == text.strip()
            words = E.ADJECTIVES[label.emotion].items(split) + E.VERB_PHRASES[label.emotion].items(split)
            assert any(_rx(w).search(text) for w in words), (label.emotion, text)
            if label.intensity in ("slight", "strong"):
                marks = E.ADJ_INTENSITY[label.intensity].items(split) + E.VERB_INTENSITY[label.intensity].items(split)
                assert any(m in text for m in marks), (label.intensity, text)
            if label.timing != "hold":
                marks = E.COPULAS[label.timing].items(split) + E.VERB_TIMINGS[label.timing].items(split)
                assert any(_rx(m).search(text) for m in marks), (label.timing, text)
    assert caption_emotion(EmotionLabel("happy", "moderate"), 0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown emotion"):
        make_emotion("bored")
    with pytest.raises(ValueError, match="intensity"):
        make_emotion("happy", "medium")
    with pytest.raises(ValueError, match="timing"):
        make_emotion("happy", "slight", "slowly")
    with pytest.raises(ValueError, match="neutral"):
        make_emotion("neutral", "strong")
    with pytest.raises(ValueError, match="n_expr"):
        sample_emotion(0, n_expr=10)
    with pytest.raises(ValueError, match="frames"):
        sample_emotion(0, frames=0)
    with pytest.raises(ValueError, match="split"):
        emotion_phrase(EmotionLabel("sad", "slight"), 0, split="dev")
    label = sample_emotion(6)[0]
    assert EmotionLabel.from_dict(label.to_dict()) == label


def test_short_clips_work():
    for frames in (1, 10, 40):
        label, expr = sample_emotion(np.random.default_rng(frames), frames=frames)
        assert expr.shape == (frames, 50) and np.isfinite(expr).all()
        assert 0 <= label.onset <= label.offset <= frames
