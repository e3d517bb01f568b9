"""Linear probes: how well do text features carry the stage-1 labels to *held-out* wordings?

Train a multinomial logistic regression on training-split captions (corpus seed 0, split "train"),
measure on test-split captions (corpus seed 1, split "test", the evaluator's corpus). Test captions
are only ever used to measure.

Motion labels (the evaluator's ``motion_acc`` notion: action + direction of every segment in
order, and the jaw action) are probed as three heads: segment 1 (10 head actions), segment 2
(none + 8 moving actions) and jaw (4); ``motion_full`` = all three right, ``motion_seg1`` = the
first segment only. Emotion: the class (7), as ``emotion_acc``.

Representations: MiniLM pooled embedding, mean of token features, anchor similarities
(:mod:`mvportrait.drivers.anchors`), with / without per-clause slot features, trained on plain or
augmented captions, and the zero-shot anchor decoding (no training).

    OMP_NUM_THREADS=1 python benchmarks/probe_text_features.py --n-train 800 --n-test 400 \
        --cache /tmp/text_probe_cache.npz --out benchmarks/results/text_probe.json

Encodings are cached in ``--cache`` (text -> pooled, mean token), so reruns are fast.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvportrait.data.corpus import Text2FlameCorpus  # noqa: E402
from mvportrait.drivers import anchors as A  # noqa: E402

SEG2 = ("none",) + tuple(h for h in A.HEAD_LABELS if h not in ("still", "sway"))


# ----------------------------------------------------------------------------- cached encoder
class _Emb:
    def __init__(self, pooled):
        self.pooled = torch.from_numpy(pooled)


class CachedEncoder:
    """MiniLM behind a persistent text -> (pooled, mean token) cache (npz)."""

    def __init__(self, path: str | None, log=print):
        self.path, self.log = path, log
        self.pooled: dict[str, np.ndarray] = {}
        self.meantok: dict[str, np.ndarray] = {}
        self._enc = None
        self._dirty = 0
        if path and os.path.exists(path):
            with np.load(path, allow_pickle=False) as z:
                for t, p, m in zip(z["texts"].tolist(), z["pooled"], z["meantok"]):
                    self.pooled[t], self.meantok[t] = p, m
            log(f"cache: {len(self.pooled)} texts from {path}")

    def save(self):
        if self.path and self._dirty:
            texts = sorted(self.pooled)
            tmp = self.path + ".tmp.npz"
            np.savez(tmp, texts=np.array(texts, dtype=str), pooled=np.stack([self.pooled[t] for t in texts]),
                     meantok=np.stack([self.meantok[t] for t in texts]))
            os.replace(tmp, self.path)
            self._dirty = 0

    def ensure(self, texts, batch: int = 64):
        from mvportrait.models.text_encoder import normalize_prompt

        missing = sorted({t for t in texts if t not in self.pooled}, key=len)
        if not missing:
            return
        if self._enc is None:
            from mvportrait.models.text_encoder import load_text_encoder

            self._enc = load_text_encoder("minilm", cache_size=0)
        t0 = time.perf_counter()
        for s in range(0, len(missing), batch):
            chunk = missing[s:s + batch]
            emb = self._enc.encode([normalize_prompt(t) for t in chunk])
            m = emb.mask.unsqueeze(-1).float()
            mean = ((emb.tokens * m).sum(1) / m.sum(1)).numpy()
            for i, t in enumerate(chunk):
                self.pooled[t], self.meantok[t] = emb.pooled[i].numpy().copy(), mean[i].copy()
            self._dirty += len(chunk)
            if self._dirty >= 512:
                self.save()
            if (s // batch) % 10 == 0:
                self.log(f"  encoded {s + len(chunk)}/{len(missing)} ({time.perf_counter() - t0:.0f}s)")
        self.save()

    def encode(self, texts):  # the TextEncoder subset AnchorFeatures uses
        self.ensure(texts)
        return _Emb(np.stack([self.pooled[t] for t in texts]))

    def get(self, texts, what="pooled"):
        self.ensure(texts)
        d = self.pooled if what == "pooled" else self.meantok
        return np.stack([d[t] for t in texts]).astype(np.float32)


# ----------------------------------------------------------------------------- data
def motion_targets(labels) -> np.ndarray:
    rows = []
    for m in labels:
        segs = [A.head_label(s.action, s.direction) for s in m.segments]
        rows.append((A.HEAD_LABELS.index(segs[0]), SEG2.index(segs[1]) if len(segs) > 1 else 0,
                     A.JAW_LABELS.index(m.jaw)))
    return np.array(rows, dtype=np.int64)


def emotion_targets(labels) -> np.ndarray:
    return np.array([[A.EMOTION_LABELS.index(e.emotion)] for e in labels], dtype=np.int64)


_FILLERS = ("just", "really", "kind of", "then", "and", "basically", "sort of", "now", "also", "gently")


def augment(text: str, rng: random.Random) -> str:
    """Label-preserving noise built from nothing but the training caption: word dropout (15 %, never
    direction words or the first word), generic filler words, and moving the subject."""
    words = text.split()
    keep = {"left", "right", "up", "down", "not", "no"}
    out = [w for i, w in enumerate(words) if i == 0 or w.strip(",;") in keep or rng.random() > 0.15]
    for _ in range(rng.randint(0, 2)):
        out.insert(rng.randint(0, len(out)), rng.choice(_FILLERS))
    return " ".join(out) if out else text


def build_data(n_train: int, n_test: int, recaptions: int, seed: int = 0):
    tr = Text2FlameCorpus.generate(n_train, seed=0, split="train")
    te = Text2FlameCorpus.generate(n_test, seed=1, split="test")
    rng = random.Random(seed)
    data = {}
    for kind in ("motion", "emotion"):
        cap = (lambda c: c.motion_captions) if kind == "motion" else (lambda c: c.emotion_captions)
        targ = (lambda c: motion_targets(c.motion_labels)) if kind == "motion" else \
            (lambda c: emotion_targets(c.emotion_labels))
        y_tr = targ(tr)
        # (c1) more training wordings per clip (what stage-1 training does with caption_texts)
        recap, y_recap = [], []
        for i in range(n_train):
            for j in range(recaptions):
                m, e, _ = tr.recaption(i, np.random.default_rng([seed, 7, i, j + 1]))
                recap.append(m if kind == "motion" else e)
                y_recap.append(y_tr[i])
        # (c2) noise augmentation of the corpus captions
        noisy = [augment(t, rng) for t in cap(tr)]
        data[kind] = {"train": (list(cap(tr)), y_tr), "test": (list(cap(te)), targ(te)),
                      "recap": (recap, np.array(y_recap).reshape(-1, y_tr.shape[1])),
                      "noisy": (noisy, y_tr)}
    return data


# ----------------------------------------------------------------------------- probe
def fit_predict(x_tr, y_tr, x_te, n_classes, wd=1e-3, iters=200):
    """Multinomial logistic regression (z-scored features, L2 ``wd``, LBFGS); test predictions."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    xt = torch.from_numpy((x_tr - mu) / sd).double()
    xe = torch.from_numpy((x_te - mu) / sd).double()
    y = torch.from_numpy(y_tr)
    torch.manual_seed(0)
    lin = torch.nn.Linear(xt.shape[1], n_classes).double()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), y) + wd * (lin.weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return lin(xe).argmax(1).numpy(), lin(xt).argmax(1).numpy()


def score(kind, pred, y) -> dict:
    if kind == "emotion":
        return {"emotion_acc": float((pred[:, 0] == y[:, 0]).mean())}
    ok = pred == y
    return {"motion_full": float(ok.all(1).mean()), "motion_seg1": float(ok[:, 0].mean()),
            "motion_seg2": float(ok[:, 1].mean()), "motion_actions": float(ok[:, :2].all(1).mean()),
            "motion_jaw": float(ok[:, 2].mean())}


def probe(kind, x_tr, y_tr, x_te, y_te, wd):
    heads = (len(A.HEAD_LABELS), len(SEG2), len(A.JAW_LABELS)) if kind == "motion" else (len(A.EMOTION_LABELS),)
    p_te, p_tr = [], []
    for h, n in enumerate(heads):
        a, b = fit_predict(x_tr, y_tr[:, h], x_te, n, wd=wd)
        p_te.append(a)
        p_tr.append(b)
    te, tr = score(kind, np.stack(p_te, 1), y_te), score(kind, np.stack(p_tr, 1), y_tr)
    return {"test": te, "train_fit": tr}


def zero_shot(kind, feats: A.AnchorFeatures, texts, y, jaw_threshold):
    dec = feats.decode(texts, jaw_threshold=jaw_threshold)
    if kind == "emotion":
        pred = np.array([[A.EMOTION_LABELS.index(d["emotion"])] for d in dec])
    else:
        pred = np.array([(A.HEAD_LABELS.index(d["segments"][0]),
                          SEG2.index(d["segments"][1]) if len(d["segments"]) > 1 and d["segments"][1] in SEG2 else 0,
                          A.JAW_LABELS.index(d["jaw"])) for d in dec])
    return score(kind, pred, y)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--recaptions", type=int, default=1, help="extra training wordings per clip for (c1)")
    ap.add_argument("--wd", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--cache", default="/tmp/text_probe_cache.npz")
    ap.add_argument("--out", default="benchmarks/results/text_probe.json")
    ap.add_argument("--encode-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.time()
    log = lambda *a: print(f"[{time.time() - t_start:6.0f}s]", *a, flush=True)  # noqa: E731

    data = build_data(args.n_train, args.n_test, args.recaptions)
    enc = CachedEncoder(args.cache, log)
    # encode in order of importance: base captions, anchors + clauses, augmentations
    for kind in ("emotion", "motion"):
        enc.ensure(data[kind]["train"][0] + data[kind]["test"][0])
    log("base captions encoded")
    feats = {k: A.AnchorFeatures(enc, k) for k in ("motion", "emotion")}
    anchor_emb = {k: enc.get(list(feats[k].phrases)) for k in feats}
    for kind in ("emotion", "motion"):
        feats[kind].features(data[kind]["train"][0] + data[kind]["test"][0])
    log("anchor features of base captions done")
    for part in ("noisy", "recap"):
        for kind in ("emotion", "motion"):
            feats[kind].features(data[kind][part][0])
    log("augmented captions encoded")
    enc.save()
    if args.encode_only:
        return

    # head margin + jaw threshold of the clause reading: chosen by zero-shot accuracy on training captions
    tuned = {}
    for margin in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3):
        f = A.AnchorFeatures(enc, "motion", head_margin=margin)
        for thr in np.arange(0.30, 0.80, 0.05):
            sc = zero_shot("motion", f, data["motion"]["train"][0], data["motion"]["train"][1], float(thr))
            if not tuned or sc["motion_full"] > tuned["train"]["motion_full"]:
                tuned = {"head_margin": margin, "jaw_threshold": round(float(thr), 3), "train": sc}
    log("tuned on train captions:", tuned)
    feats["motion"] = A.AnchorFeatures(enc, "motion", head_margin=tuned["head_margin"])

    def slot_pooled(texts):
        """MiniLM pooled embeddings of the sentence and of its 1st / 2nd head-action clause (0 if none)."""
        return np.concatenate([enc.get(texts), feats["motion"].slot_embeddings(texts).reshape(len(texts), -1)], 1)

    def rep(kind, name, texts):
        if name == "pooled":
            return enc.get(texts)
        if name == "meantok":
            return enc.get(texts, "meantok")
        if name == "pooled+meantok":
            return np.concatenate([enc.get(texts), enc.get(texts, "meantok")], 1)
        if name == "anchor_phrase_sims":
            return enc.get(texts) @ anchor_emb[kind].T
        f = feats[kind].features(texts)
        n_lab = len(feats[kind].label_names)
        if name == "anchor_labels":
            return f[:, :n_lab]
        if name == "anchor_labels+slots":
            return f
        if name == "anchor_slots_only":
            return f[:, n_lab:]
        if name == "pooled+anchor_labels+slots":
            return np.concatenate([enc.get(texts), f], 1)
        if name == "clause_slot_pooled":
            return slot_pooled(texts)
        if name == "clause_slot_pooled+anchors":
            return np.concatenate([slot_pooled(texts), f], 1)
        raise KeyError(name)

    reps = {"motion": ["pooled", "meantok", "pooled+meantok", "anchor_phrase_sims", "anchor_labels",
                       "anchor_slots_only", "anchor_labels+slots", "pooled+anchor_labels+slots",
                       "clause_slot_pooled", "clause_slot_pooled+anchors"],
            "emotion": ["pooled", "meantok", "pooled+meantok", "anchor_phrase_sims", "anchor_labels",
                        "pooled+anchor_labels"]}
    train_sets = {"plain": ("train",), "recap": ("train", "recap"), "noisy": ("train", "noisy"),
                  "recap+noisy": ("train", "recap", "noisy")}
    results = []
    for kind in ("emotion", "motion"):
        te_texts, y_te = data[kind]["test"]
        for name in reps[kind]:
            real = "anchor_labels" if name == "pooled+anchor_labels" else name
            for ts, parts in train_sets.items():
                if ts != "plain" and name in ("meantok", "pooled+meantok", "anchor_phrase_sims", "anchor_labels",
                                              "anchor_slots_only", "clause_slot_pooled"):
                    continue
                texts = sum((data[kind][p][0] for p in parts), [])
                y = np.concatenate([data[kind][p][1] for p in parts])
                x_tr, x_te = rep(kind, real, texts), rep(kind, real, te_texts)
                if name == "pooled+anchor_labels":
                    x_tr = np.concatenate([enc.get(texts), x_tr], 1)
                    x_te = np.concatenate([enc.get(te_texts), x_te], 1)
                for wd in args.wd:
                    r = probe(kind, x_tr, y, x_te, y_te, wd)
                    row = {"kind": kind, "features": name, "train_set": ts, "wd": wd, "dim": int(x_tr.shape[1]),
                           "n_train": len(texts), **r}
                    results.append(row)
                    log(kind, name, ts, wd, r["test"])
        # zero-shot, jaw threshold chosen on the training captions only
        thr = tuned["jaw_threshold"] if kind == "motion" else 0.5
        s_te = zero_shot(kind, feats[kind], te_texts, y_te, thr)
        s_tr = zero_shot(kind, feats[kind], data[kind]["train"][0], data[kind]["train"][1], thr)
        results.append({"kind": kind, "features": "zero_shot_anchor_decode",
                        "train_set": "none (margin/threshold tuned on train)", "jaw_threshold": thr,
                        "head_margin": tuned["head_margin"] if kind == "motion" else None,
                        "test": s_te, "train_fit": s_tr})
        log(kind, "zero-shot", thr, s_te)
    out = {"tuned_on_train": tuned,
           "meta": {"n_train_clips": args.n_train, "n_test_clips": args.n_test, "recaptions": args.recaptions,
                    "train_corpus": "seed 0 split train", "test_corpus": "seed 1 split test (evaluator's)",
                    "encoder": "all-MiniLM-L6-v2", "probe": "multinomial logistic regression, z-scored, LBFGS, L2 wd",
                    "platform": platform.platform(), "seconds": round(time.time() - t_start, 1)},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    log("wrote", args.out)


if __name__ == "__main__":
    main()
