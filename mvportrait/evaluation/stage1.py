"""Evaluation of Text2FLAME on the held-out test split (wordings never seen in training).

For ``n`` test clips (``Text2FlameCorpus.generate(n, seed, split="test")``; ``split="train"`` scores
the first training clips instead, to tell underfitting from failing to generalise) the motion caption
drives MotionDM and the emotion caption drives EmotionDM (the captions themselves, not the
prompt splitter, so the numbers measure the models). Generated sequences are 100 frames (4 s at
25 fps), sampled with DDIM at each requested step count, with the same seeds for every setting.

Metrics (each also computed with the window-3 smoothing off when ``compare_smoothing``):

- ``motion_acc``: fraction of clips whose analysed head actions (action + direction of every
  segment, in order) and jaw action equal the caption's label (``motion_analyser.compare``'s
  ``actions`` and ``jaw``): what is done, in which direction, and what the mouth does.
  ``motion_all_acc`` additionally needs count, speed and amplitude (``compare(...)["all"]``);
  ``motion_<attr>`` gives each attribute.
- ``emotion_acc``: analysed emotion class == caption emotion; ``emotion_intensity`` /
  ``emotion_timing`` need the class and that attribute to agree.
- ``rprec_top1`` / ``rprec_top3`` (text-to-motion R-precision): for generated clip ``i`` the
  candidates are its own caption and 31 other test captions drawn at random (seeded). A
  candidate's score is the number of attributes of ``motion_analyser.compare(label_j, analysis_i)``
  that agree (actions, count, speed, amplitude, jaw; 0..5) plus those of
  ``emotion_analyser.compare`` (emotion, intensity, timing, blinks; 0..4). Ties are broken uniformly at
  random, in expectation: with ``b`` candidates scoring higher and ``q`` others scoring equal,
  ``P(rank <= k) = clip((k - b) / (q + 1), 0, 1)``. Chance level is 1/32 and 3/32.
- ``diversity_motion`` / ``diversity_emotion``: mean L2 distance between the flattened
  sequences (radians / coefficients) of 300 random pairs of generated clips; the same on the test
  corpus's ground-truth clips is reported as the reference.
- ``jitter_motion`` / ``jitter_emotion``: ``motion_analyser.jitter`` (mean |second difference|)
  of the generated sequences; the corpus value is the reference (target: not higher).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from mvportrait.data.corpus import Text2FlameCorpus
from mvportrait.engine.text2flame import cond_rows
from mvportrait.evaluation import emotion_analyser as ea
from mvportrait.evaluation import motion_analyser as ma

log = logging.getLogger(__name__)

MOTION_ATTRS = ("actions", "count", "speed", "amplitude", "jaw")
EMOTION_ATTRS = ("emotion", "intensity", "timing", "blinks")
CANDIDATES = 32


def _pose_dict(x: np.ndarray) -> dict:
    return {"global_pose": x[:, 0:3], "neck_pose": x[:, 3:6], "jaw_pose": x[:, 6:9]}


def r_precision(score: np.ndarray, rng: np.random.Generator, ks=(1, 3), candidates: int = CANDIDATES) -> dict:
    """Expected R-precision from an (n, n) score matrix ``score[i, j]`` (generated i vs caption j; true = i)."""
    n = score.shape[0]
    hits = {k: 0.0 for k in ks}
    for i in range(n):
        others = rng.choice(np.delete(np.arange(n), i), size=min(candidates - 1, n - 1), replace=False)
        s_true = score[i, i]
        s = score[i, others]
        better, ties = int((s > s_true).sum()), int((s == s_true).sum())
        for k in ks:
            hits[k] += float(np.clip((k - better) / (ties + 1), 0.0, 1.0))
    return {f"rprec_top{k}": hits[k] / n for k in ks}


def diversity(x: np.ndarray, rng: np.random.Generator, pairs: int = 300) -> float:
    """Mean L2 distance between flattened sequences of random distinct pairs."""
    n = x.shape[0]
    flat = x.reshape(n, -1).astype(np.float64)
    a = rng.integers(0, n, pairs)
    b = (a + rng.integers(1, n, pairs)) % n
    return float(np.linalg.norm(flat[a] - flat[b], axis=1).mean())


def score_clips(motion: np.ndarray, expression: np.ndarray, corpus: Text2FlameCorpus, fps: float = 25.0,
                seed: int = 0) -> dict:
    """All metrics for generated ``motion`` (n, T, 9) and ``expression`` (n, T, E) against ``corpus``."""
    n = motion.shape[0]
    m_an = [ma.analyse_motion(_pose_dict(motion[i]), fps) for i in range(n)]
    e_an = [ea.analyse_emotion(expression[i], fps) for i in range(n)]
    m_cmp = [ma.compare(corpus.motion_labels[i], m_an[i]) for i in range(n)]
    e_cmp = [ea.compare(corpus.emotion_labels[i], e_an[i]) for i in range(n)]
    out = {"motion_acc": float(np.mean([c["actions"] and c["jaw"] for c in m_cmp])),
           "motion_all_acc": float(np.mean([c["all"] for c in m_cmp])),
           "emotion_acc": float(np.mean([c["emotion"] for c in e_cmp]))}
    for a in MOTION_ATTRS:
        out[f"motion_{a}"] = float(np.mean([c[a] for c in m_cmp]))
    for a in EMOTION_ATTRS[1:]:
        out[f"emotion_{a}"] = float(np.mean([c[a] for c in e_cmp]))
    score = np.zeros((n, n))
    for j in range(n):  # caption j against every generated clip i
        ml, el = corpus.motion_labels[j], corpus.emotion_labels[j]
        for i in range(n):
            mc, ec = ma.compare(ml, m_an[i]), ea.compare(el, e_an[i])
            score[i, j] = sum(mc[a] for a in MOTION_ATTRS) + sum(ec[a] for a in EMOTION_ATTRS)
    rng = np.random.default_rng(seed)
    out.update(r_precision(score, rng))
    out["diversity_motion"] = diversity(motion, np.random.default_rng(seed + 1))
    out["diversity_emotion"] = diversity(expression, np.random.default_rng(seed + 1))
    out["jitter_motion"] = ma.jitter(motion)
    out["jitter_emotion"] = ma.jitter(expression)
    return out


def corpus_reference(corpus: Text2FlameCorpus, seed: int = 0) -> dict:
    """Diversity and jitter of the ground-truth test clips (what generated clips are compared with)."""
    motion, expr = corpus.motion_features(), corpus.expression
    return {"diversity_motion": diversity(motion, np.random.default_rng(seed + 1)),
            "diversity_emotion": diversity(expr, np.random.default_rng(seed + 1)),
            "jitter_motion": ma.jitter(motion), "jitter_emotion": ma.jitter(expr),
            "max_step_motion": float(np.abs(np.diff(motion, axis=1)).max())}


@torch.no_grad()
def evaluate(pipe, *, n: int = 200, steps=(50, 10, 4), guidance: float | None = None, seed: int = 0,
             corpus_seed: int | None = None, compare_smoothing: bool = True, batch: int = 100,
             split: str = "test", on_progress=None) -> dict:
    """Evaluate a :class:`~mvportrait.engine.text2flame.Text2FLAME` pipeline; returns a dict with
    ``reference`` (corpus) and ``results`` (one entry per step count and smoothing setting).

    ``split="test"`` (default; corpus seed 1) measures held-out wordings on unseen clips.
    ``split="train"`` (corpus seed 0: the first ``n`` training clips with their own corpus captions)
    measures how well the models fit what they were trained on (a diagnosis, not the target)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if corpus_seed is None:
        corpus_seed = 1 if split == "test" else 0
    corpus = Text2FlameCorpus.generate(n, seed=corpus_seed, split=split, frames=pipe.window)
    t0 = time.perf_counter()
    m_text, e_text = pipe.encode(corpus.motion_captions, corpus.emotion_captions)
    encode_s = time.perf_counter() - t0
    shown = pipe.default_guidance() if guidance is None else {"motion": guidance, "emotion": guidance}
    results = []
    for st in steps:
        raw = {}
        t0 = time.perf_counter()
        for key, model, text, off in (("motion", pipe.motion_model, m_text, 0),
                                      ("emotion", pipe.emotion_model, e_text, 1)):
            chunks = []
            for s in range(0, n, batch):
                g = torch.Generator().manual_seed(seed * 1000 + off * 100 + s)
                chunks.append(pipe.sample(model, cond_rows(text, slice(s, s + batch)), pipe.window, steps=st,
                                          guidance=guidance, generator=g, smooth=False))
            raw[key] = torch.cat(chunks).cpu()
        gen_s = time.perf_counter() - t0
        from mvportrait.models.motion_denoiser import smooth_frames

        for smooth in ((True, False) if compare_smoothing else (True,)):
            mot = smooth_frames(raw["motion"], pipe.motion_model.cfg.smooth) if smooth else raw["motion"]
            emo = smooth_frames(raw["emotion"], pipe.emotion_model.cfg.smooth) if smooth else raw["emotion"]
            metrics = score_clips(mot.numpy(), emo.numpy(), corpus, seed=seed)
            results.append({"steps": st, "smooth": smooth, "guidance": shown, "generate_s": round(gen_s, 3),
                            **{k: round(v, 6) for k, v in metrics.items()}})
            if on_progress:
                on_progress(results[-1])
    return {"n": n, "corpus_seed": corpus_seed, "split": split, "encode_s": round(encode_s, 3),
            "reference": corpus_reference(corpus, seed), "results": results}


def to_rows(name: str, model_label: str, report: dict, row_fn) -> list[dict]:
    """Harness rows (one per metric and setting) from an :func:`evaluate` report."""
    rows = []
    for r in report["results"]:
        cfg = {"model": model_label, "steps": r["steps"], "smooth": r["smooth"], "guidance": r["guidance"],
               "n": report["n"], "split": report.get("split", "test")}
        for k, v in r.items():
            if k in ("steps", "smooth", "guidance"):
                continue
            unit = "s" if k.endswith("_s") else "rad/frame^2" if k == "jitter_motion" else \
                "coef/frame^2" if k == "jitter_emotion" else "L2" if k.startswith("diversity") else "fraction"
            rows.append(row_fn(name, "torch", k, unit, [v], cfg))
    for k, v in report["reference"].items():
        rows.append(row_fn(name, "corpus", k, "reference", [v], {"model": "corpus(test)", "n": report["n"]}))
    return rows


__all__ = ["evaluate", "score_clips", "corpus_reference", "r_precision", "diversity", "to_rows"]
