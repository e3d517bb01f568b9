"""Stage-1 evaluation: metrics on ground truth (the analysers' ceiling), R-precision, diversity."""
import numpy as np
import pytest
import torch

from mvportrait.config import DenoiserConfig
from mvportrait.data.corpus import Text2FlameCorpus
from mvportrait.engine.text2flame import Text2FLAME
from mvportrait.evaluation.stage1 import corpus_reference, diversity, evaluate, r_precision, score_clips, to_rows
from mvportrait.models.motion_denoiser import MotionDenoiser
from mvportrait.models.text_encoder import HashingEncoder


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread (and do not fight a busy machine's other processes)."""


def test_ground_truth_scores_perfectly():
    c = Text2FlameCorpus.generate(12, seed=1, split="test")
    out = score_clips(c.motion_features(), c.expression, c)
    assert out["motion_acc"] == 1.0 and out["motion_all_acc"] == 1.0 and out["emotion_acc"] == 1.0
    assert out["rprec_top1"] > 0.6 and out["rprec_top3"] >= out["rprec_top1"]
    ref = corpus_reference(c)
    assert out["jitter_motion"] == pytest.approx(ref["jitter_motion"])
    assert out["diversity_motion"] == pytest.approx(ref["diversity_motion"])


def test_r_precision_ties_and_order():
    rng = np.random.default_rng(0)
    assert r_precision(np.eye(8), rng, candidates=4) == {"rprec_top1": 1.0, "rprec_top3": 1.0}
    flat = r_precision(np.zeros((8, 8)), rng, candidates=4)  # all tie: expected 1/4 and 3/4
    assert flat["rprec_top1"] == pytest.approx(0.25) and flat["rprec_top3"] == pytest.approx(0.75)
    worst = r_precision(1 - np.eye(8), rng, candidates=4)
    assert worst["rprec_top1"] == 0.0 and worst["rprec_top3"] == 0.0


def test_diversity():
    rng = np.random.default_rng(0)
    assert diversity(np.ones((5, 3, 2)), rng) == 0.0
    x = np.zeros((2, 1, 1))
    x[1] = 3.0
    assert diversity(x, rng) == pytest.approx(3.0)


def test_evaluate_tiny_pipeline():
    torch.manual_seed(0)
    m = MotionDenoiser(DenoiserConfig.from_name("tiny", "motion", max_frames=100))
    e = MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion", max_frames=100))
    pipe = Text2FLAME(m, e, HashingEncoder())
    rep = evaluate(pipe, n=6, steps=(2,), guidance=1.0, batch=4)
    assert [(r["steps"], r["smooth"]) for r in rep["results"]] == [(2, True), (2, False)]
    smooth, raw = rep["results"]
    assert smooth["jitter_motion"] <= raw["jitter_motion"]
    for k in ("motion_acc", "emotion_acc", "rprec_top1", "rprec_top3"):
        assert 0.0 <= smooth[k] <= 1.0
    keys = ("name", "backend", "metric", "unit", "s", "config")
    rows = to_rows("stage1_eval", "tiny", rep, lambda *a: dict(zip(keys, a)))
    assert any(r["metric"] == "motion_acc" and r["config"]["steps"] == 2 for r in rows)


def test_evaluate_tokens_pipeline_on_the_train_split():
    torch.manual_seed(0)
    m = MotionDenoiser(DenoiserConfig.from_name("tiny", "motion", max_frames=100, text_cond="tokens"))
    e = MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion", max_frames=100, text_cond="tokens"))
    rep = evaluate(Text2FLAME(m, e, HashingEncoder()), n=5, steps=(2,), batch=3, compare_smoothing=False,
                   split="train")
    assert rep["split"] == "train" and rep["corpus_seed"] == 0 and len(rep["results"]) == 1
    assert 0.0 <= rep["results"][0]["motion_acc"] <= 1.0
    with pytest.raises(ValueError, match="split"):
        evaluate(Text2FLAME(m, e, HashingEncoder()), n=5, steps=(2,), split="val")
