import re

import numpy as np
import pytest

from mvportrait.data import emotion as emotion_data
from mvportrait.data import motion as motion_data
from mvportrait.data.corpus import all_banks
from mvportrait.drivers import anchors as A
from mvportrait.models.text_encoder import HashingEncoder


@pytest.fixture(scope="module")
def encoder():
    return HashingEncoder(dim=256)


def _fill(w: str) -> set[str]:
    """A bank wording with every placeholder filled in every plausible way."""
    texts = {w}
    for key, values in (("{poss}", ("the", "his", "her", "their")), ("{dir}", ("left", "right")),
                        ("{n} {noun}", ("a nod", "a head shake"))):
        texts = {t.replace(key, v) for t in texts for v in values} if any(key in t for t in texts) else texts
    return {re.sub(r"\s+", " ", re.sub(r"\{\w+\}", "", t)).strip(" ,;") for t in texts}


def test_anchors_use_no_held_out_wording():
    train, test = set(), set()
    for bank in all_banks().values():
        for split, into in (("train", train), ("test", test)):
            for w in bank.items(split):
                into |= _fill(w[0] if isinstance(w, tuple) else w)
    held_out = test - train - {""}
    vocabulary = set(motion_data.HEAD_ACTIONS) | set(emotion_data.EMOTIONS)  # label names are fair game
    phrases = {p for group in A.ANCHORS.values() for ps in group.values() for p in ps}
    leaked = {p for p in phrases if p in held_out and p not in vocabulary}
    assert not leaked, f"anchor phrases copied from held-out wordings: {sorted(leaked)}"


def test_label_sets_cover_the_corpus_vocabulary():
    heads = {A.head_label(a, d) for a in motion_data.HEAD_ACTIONS for d in motion_data.DIRECTIONS.get(a, (None,))}
    assert heads == set(A.HEAD_LABELS)
    assert set(A.JAW_LABELS) == set(motion_data.JAW_ACTIONS)
    assert set(A.EMOTION_LABELS) == set(emotion_data.EMOTIONS)
    assert all(ps for group in A.ANCHORS.values() for ps in group.values())


@pytest.mark.parametrize("text, clauses", [
    ("he nods twice, then turns left while talking", ["he nods twice", "turns left", "talking"]),
    ("shakes his head left and right and then looks up", ["shakes his head left and right", "looks up"]),
    ("first tilts to the left, and after that nods", ["tilts to the left", "nods"]),
    ("nods", ["nods"]),
    ("   ", ["   ".strip()]),
])
def test_split_clauses(text, clauses):
    assert A.split_clauses(text) == clauses


def test_features_shape_cache_and_batch_independence(encoder):
    f = A.AnchorFeatures(encoder, "motion")
    prompts = ["nods twice, then turns to the left while talking", "looks up slowly", "stays still"]
    x = f.features(prompts)
    assert x.shape == (3, f.dim) and x.dtype == np.float32
    assert f.dim == len(f.label_names) + 2 * len(A.HEAD_LABELS) + 1 + len(A.JAW_LABELS)
    one = np.concatenate([f.features(p) for p in prompts])
    np.testing.assert_allclose(x, one, atol=1e-6)
    x[:] = 0  # callers get copies, not the cache
    np.testing.assert_allclose(f.features(prompts), one, atol=1e-6)
    e = A.AnchorFeatures(encoder, "emotion")
    assert e.features(["looks very happy"]).shape == (1, e.dim) == (1, len(e.label_names))
    plain = A.AnchorFeatures(encoder, "motion", clauses=False)
    assert plain.dim == len(plain.label_names)


def test_zero_shot_decode_on_training_wordings(encoder):
    f = A.AnchorFeatures(encoder, "motion")
    d = f.decode(["he nods twice, then turns to the left while talking", "the woman looks down"])
    assert d[0]["segments"] == ["nod", "turn_left"] and d[0]["jaw"] == "talk"
    assert d[1]["segments"] == ["look_down"]
    e = A.AnchorFeatures(encoder, "emotion")
    assert [r["emotion"] for r in e.decode(["she looks very happy", "he suddenly becomes furious"])] == \
        ["happy", "angry"]


def test_slot_embeddings(encoder):
    f = A.AnchorFeatures(encoder, "motion")
    x = f.slot_embeddings(["he nods twice, then turns to the left", "looks up", "nods"])
    assert x.shape == (3, 2, encoder.dim) and x.dtype == np.float32
    ref = encoder.encode(["he nods twice", "turns to the left"]).pooled.numpy()
    np.testing.assert_allclose(x[0], ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    assert np.abs(x[1, 0]).sum() > 0 and np.abs(x[1, 1]).sum() == 0


def test_bad_kind(encoder):
    with pytest.raises(ValueError):
        A.AnchorFeatures(encoder, "voice")
