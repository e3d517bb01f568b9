"""The captioned Text2FLAME corpus for stage 1 (MotionDM + EmotionDM), generated from a seed.

Each sample pairs a head/jaw motion clip (:mod:`mvportrait.data.motion`) and an expression clip
(:mod:`mvportrait.data.emotion`) of the same length with three captions sharing one subject:
the motion caption ("a man nods twice, then turns to the left"), the emotion caption ("a man
looks very happy") and a combined prompt ("a man nods twice, then turns to the left and looks
very happy"), joined by one of several templates.

Split: every phrase bank (subjects, verbs, modifiers, sequencers, emotion words, joining
templates) lists its wordings as ``train`` or ``test`` (fixed, in the source). A ``split="test"``
corpus renders captions from held-out wordings only and its clips come from a different seed
stream, so evaluation measures generalisation to unseen wordings; :func:`split_report` counts
them. Sample ``i`` depends only on ``(seed, split, i)``, so corpora of different sizes agree
on their common prefix.

A generated corpus saves to one ``.npz`` (plain arrays, strings as unicode arrays and labels as
JSON; loading never unpickles).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

from mvportrait.data import emotion as emotion_data
from mvportrait.data import motion as motion_data
from mvportrait.data.emotion import EmotionLabel, emotion_phrase, sample_emotion
from mvportrait.data.motion import SPLITS, SUBJECTS, Bank, MotionLabel, motion_phrase, sample_motion, with_subject

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
POSE_KEYS = ("global_pose", "neck_pose", "jaw_pose")
JOINS = Bank(train=("{m} and {e}", "{m}, and {e}", "{e} and {m}", "{e}, and {m}", "{m} and also {e}"),
             test=("{m}, and at the same time {e}", "{e}, and meanwhile {m}", "{m} and simultaneously {e}"))
_SPLIT_CODE = {"train": 0, "test": 1}


def all_banks() -> dict[str, Bank]:
    """Every phrase bank used by corpus captions, by a dotted name."""
    out = {f"motion.{k}": v for k, v in motion_data.banks().items()}
    out.update({f"emotion.{k}": v for k, v in emotion_data.banks().items() if k != "subjects"})
    out["corpus.joins"] = JOINS
    return out


def wording_text(w) -> str:
    """The text of a bank entry (subjects are (subject, possessive) pairs); "" for an omitted slot
    or a template that is only a placeholder (such as "{v}")."""
    text = w[0] if isinstance(w, tuple) else w
    return text if re.sub(r"\{\w+\}", "", text).strip(" ,;") else ""


def split_report() -> dict[str, dict[str, int]]:
    """Number of distinct non-empty wordings per bank and split, plus the totals."""
    out = {}
    total = {"train": 0, "test": 0}
    for name, bank in all_banks().items():
        counts = {s: len({w for w in bank.items(s) if wording_text(w)}) for s in SPLITS}
        out[name] = counts
        for s in SPLITS:
            total[s] += counts[s]
    out["total"] = total
    return out


def caption_sample(motion_label: MotionLabel, emotion_label: EmotionLabel, rng, split: str = "train"):
    """(motion caption, emotion caption, prompt) for a pair of labels, one subject for all three."""
    rng = motion_data.as_rng(rng)
    subject, poss = SUBJECTS.pick(rng, split)
    m = motion_phrase(motion_label, rng, split, poss)
    e = emotion_phrase(emotion_label, rng, split, poss)
    join = JOINS.pick(rng, split)
    return with_subject(subject, m), with_subject(subject, e), with_subject(subject, join.format(m=m, e=e))


@dataclass
class Text2FlameSample:
    motion_caption: str
    emotion_caption: str
    prompt: str
    motion: MotionLabel
    emotion: EmotionLabel
    global_pose: np.ndarray  # (T, 3)
    neck_pose: np.ndarray    # (T, 3)
    jaw_pose: np.ndarray     # (T, 3)
    expression: np.ndarray   # (T, n_expr)

    @property
    def poses(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in POSE_KEYS}


class Text2FlameCorpus:
    """N captioned clips: arrays ``global_pose`` / ``neck_pose`` / ``jaw_pose`` (N, T, 3) and
    ``expression`` (N, T, n_expr) float32, caption lists and label lists."""

    def __init__(self, *, global_pose, neck_pose, jaw_pose, expression, motion_captions, emotion_captions,
                 prompts, motion_labels, emotion_labels, meta: dict):
        self.global_pose, self.neck_pose, self.jaw_pose = global_pose, neck_pose, jaw_pose
        self.expression = expression
        self.motion_captions, self.emotion_captions, self.prompts = motion_captions, emotion_captions, prompts
        self.motion_labels, self.emotion_labels = motion_labels, emotion_labels
        self.meta = dict(meta)
        n = len(prompts)
        for name in (*POSE_KEYS, "expression"):
            a = getattr(self, name)
            if a.ndim != 3 or a.shape[0] != n:
                raise ValueError(f"corpus array {name} has shape {a.shape}, expected ({n}, T, D)")
        for name in ("motion_captions", "emotion_captions", "motion_labels", "emotion_labels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"corpus {name} has {len(getattr(self, name))} entries, expected {n}")

    # ----------------------------------------------------------------------- generate
    @classmethod
    def generate(cls, n: int, seed: int = 0, split: str = "train", frames: int = 100, fps: float = 25.0,
                 n_expr: int = 50) -> "Text2FlameCorpus":
        """Build ``n`` samples deterministically from ``seed`` for ``split`` ("train" or "test")."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        frames, fps = motion_data.check_clip_args(frames, fps)
        poses = {k: np.empty((n, frames, 3), np.float32) for k in POSE_KEYS}
        expression = np.empty((n, frames, n_expr), np.float32)
        mcap, ecap, prompts, mlab, elab = [], [], [], [], []
        for i in range(n):
            ss = np.random.SeedSequence([int(seed), _SPLIT_CODE[split], i])
            r_motion, r_emotion, r_text = (np.random.default_rng(s) for s in ss.spawn(3))
            m_label, m_poses = sample_motion(r_motion, frames, fps)
            e_label, expr = sample_emotion(r_emotion, frames, fps, n_expr)
            mc, ec, pr = caption_sample(m_label, e_label, r_text, split)
            for k in POSE_KEYS:
                poses[k][i] = m_poses[k]
            expression[i] = expr
            mcap.append(mc)
            ecap.append(ec)
            prompts.append(pr)
            mlab.append(m_label)
            elab.append(e_label)
        meta = {"seed": int(seed), "split": split, "frames": frames, "fps": fps, "n_expr": int(n_expr),
                "version": FORMAT_VERSION}
        return cls(**poses, expression=expression, motion_captions=mcap, emotion_captions=ecap, prompts=prompts,
                   motion_labels=mlab, emotion_labels=elab, meta=meta)

    # ------------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Text2FlameSample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a corpus of {len(self)}")
        return Text2FlameSample(self.motion_captions[i], self.emotion_captions[i], self.prompts[i],
                                self.motion_labels[i], self.emotion_labels[i], self.global_pose[i],
                                self.neck_pose[i], self.jaw_pose[i], self.expression[i])

    @property
    def split(self) -> str:
        return self.meta["split"]

    @property
    def fps(self) -> float:
        return self.meta["fps"]

    def motion_features(self) -> np.ndarray:
        """(N, T, 9) float32: global, neck and jaw pose concatenated (MotionDM's target)."""
        return np.concatenate([self.global_pose, self.neck_pose, self.jaw_pose], axis=-1)

    def recaption(self, i: int, rng) -> tuple[str, str, str]:
        """Fresh (motion caption, emotion caption, prompt) for sample ``i`` from its split's wordings
        (caption augmentation during training)."""
        return caption_sample(self.motion_labels[i], self.emotion_labels[i], rng, self.split)

    # ----------------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike, compress: bool = False) -> None:
        """Write one ``.npz``: arrays, captions as unicode arrays, labels as JSON strings. 20k clips of
        100 frames take about 0.5 GB (``compress=True`` saves a little, the noise does not compress)."""
        (np.savez_compressed if compress else np.savez)(
            path, global_pose=self.global_pose, neck_pose=self.neck_pose, jaw_pose=self.jaw_pose,
            expression=self.expression, motion_captions=np.array(self.motion_captions, dtype=str),
            emotion_captions=np.array(self.emotion_captions, dtype=str), prompts=np.array(self.prompts, dtype=str),
            motion_labels=np.array([json.dumps(m.to_dict()) for m in self.motion_labels], dtype=str),
            emotion_labels=np.array([json.dumps(e.to_dict()) for e in self.emotion_labels], dtype=str),
            meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Text2FlameCorpus":
        """Read a corpus written by :meth:`save` (no pickles are loaded)."""
        with np.load(path, allow_pickle=False) as z:
            missing = {"meta", "prompts", "expression", *POSE_KEYS} - set(z.files)
            if missing:
                raise ValueError(f"{path} is not a Text2FLAME corpus (missing {sorted(missing)})")
            meta = json.loads(str(z["meta"]))
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"{path} has corpus format {meta.get('version')}, expected {FORMAT_VERSION}")
            return cls(global_pose=z["global_pose"], neck_pose=z["neck_pose"], jaw_pose=z["jaw_pose"],
                       expression=z["expression"], motion_captions=z["motion_captions"].tolist(),
                       emotion_captions=z["emotion_captions"].tolist(), prompts=z["prompts"].tolist(),
                       motion_labels=[MotionLabel.from_dict(json.loads(s)) for s in z["motion_labels"].tolist()],
                       emotion_labels=[EmotionLabel.from_dict(json.loads(s)) for s in z["emotion_labels"].tolist()],
                       meta=meta)

    @classmethod
    def cached(cls, path: str | os.PathLike, n: int, **kw) -> "Text2FlameCorpus":
        """Load ``path`` if it holds a corpus generated with the same arguments, else generate and save it."""
        want = {"seed": kw.get("seed", 0), "split": kw.get("split", "train"), "frames": kw.get("frames", 100),
                "fps": float(kw.get("fps", 25.0)), "n_expr": kw.get("n_expr", 50), "version": FORMAT_VERSION}
        if os.path.exists(path):
            try:
                corpus = cls.load(path)
                if corpus.meta == want and len(corpus) == n:
                    return corpus
                log.info("corpus cache %s was made with other arguments; regenerating", path)
            except (ValueError, OSError, KeyError) as e:
                log.warning("corpus cache %s unreadable (%s); regenerating", path, e)
        corpus = cls.generate(n, **kw)
        corpus.save(path)
        return corpus


def generate_corpus(n: int, seed: int = 0, split: str = "train", **kw) -> Text2FlameCorpus:
    """Shorthand for :meth:`Text2FlameCorpus.generate`."""
    return Text2FlameCorpus.generate(n, seed=seed, split=split, **kw)
