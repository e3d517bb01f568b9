"""Semantic-anchor text features: how close a prompt (and each of its clauses) is to short anchor
phrases that describe every stage-1 label.

Why: the denoisers are conditioned on MiniLM token/pooled features, and a probe trained on the
training wordings of the corpus reads the label back from those features badly on held-out wordings
(``benchmarks/probe_text_features.py``). Cosine similarities to a fixed set of anchor phrases are
a low-dimensional, wording-agnostic summary: an unseen synonym ("glad") lands close to the anchors
of its label ("happy", "cheerful") even when its raw embedding lies off the training manifold.

Anchor phrases (``ANCHORS``) are written **only** from the label vocabulary of
:mod:`mvportrait.data.motion` / :mod:`mvportrait.data.emotion` (label names, directions) and the
``train`` wordings of the corpus phrase banks, with subjects and possessives stripped. No held-out
(``test``) wording is used, so the features can be evaluated honestly on the test split.

Features (:class:`AnchorFeatures`):

- ``sentence``: cosine similarity of the prompt's pooled embedding to every anchor phrase, then the
  max over each label's phrases (``label_names``): ``(B, n_labels)``.
- ``slots`` (motion only): the prompt is cut into clauses (:func:`split_clauses`), each clause is
  scored against the label anchors and assigned to its best anchor group; the head-action scores of
  the first and second head-action clauses ("nods twice, *then* turns left"), a flag for a second
  one, and the max jaw score over clauses: ``(B, 2 * n_head + 1 + n_jaw)``. This keeps the order of
  the two head segments, which a single pooled vector blurs.
- :meth:`AnchorFeatures.features` concatenates them into one fixed-size float32 vector per prompt
  (``dim``), cached per prompt; :meth:`AnchorFeatures.decode` is a zero-shot reading of the labels
  from the same scores (no training at all).
- :meth:`AnchorFeatures.slot_embeddings`: the encoder's own embeddings of the first / second
  head-action clause, ``(B, 2, D)``: with the sentence embedding, the best motion representation
  of the probe study (see ``benchmarks/results/text_probe.json``).

Probe results (MiniLM, logistic probe trained on training wordings, held-out test wordings): anchor
similarities alone do **not** beat the pooled embedding; the clause slots (order-preserving) help
motion (segment actions 0.48 -> 0.63); nothing here moves emotion past ~0.79, because MiniLM itself
places several held-out synonyms nearer the wrong label ("gloomy"/"sorrowful" nearer "happy" than
"sad").

Nothing here is trained; it needs a :class:`~mvportrait.models.text_encoder.TextEncoder` (MiniLM for
the probe numbers; the hashing fallback works but only matches words).
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

# ----------------------------------------------------------------------------- anchor phrases
# Label vocabulary + training-split wordings only (see module docstring).
HEAD_ANCHORS: dict[str, tuple[str, ...]] = {
    "nod": ("nod", "nods", "nods the head", "nods the head up and down", "dips the head", "nods in agreement",
            "gives a nod"),
    "shake": ("shake the head", "shakes the head", "shakes the head no", "shakes the head from side to side",
              "shakes the head left and right", "gives a head shake"),
    "turn_left": ("turns left", "turns to the left", "turns the head to the left", "looks to the left",
                  "rotates the head to the left", "turns the head left"),
    "turn_right": ("turns right", "turns to the right", "turns the head to the right", "looks to the right",
                   "rotates the head to the right", "turns the head right"),
    "tilt_left": ("tilts left", "tilts the head to the left", "tilts the head left", "leans the head to the left",
                  "cocks the head to the left", "tilts to the left"),
    "tilt_right": ("tilts right", "tilts the head to the right", "tilts the head right", "leans the head to the right",
                   "cocks the head to the right", "tilts to the right"),
    "look_up": ("looks up", "raises the head", "looks upward", "lifts the head"),
    "look_down": ("looks down", "lowers the head", "looks downward", "drops the head"),
    "still": ("stays still", "keeps the head still", "holds the head steady", "does not move", "remains motionless",
              "still"),
    "sway": ("sways the head gently", "makes small idle head movements", "sways gently", "moves the head idly",
             "sway"),
}
JAW_ANCHORS: dict[str, tuple[str, ...]] = {
    "talk": ("talks", "talking", "while talking", "while speaking", "as if speaking", "while saying something"),
    "open_close": ("opens and closes the mouth", "while opening and closing the mouth", "briefly opens the mouth"),
    "open_wide": ("opens the mouth wide", "with the mouth wide open", "opens the mouth as wide as possible"),
    "none": ("with the mouth closed", "keeping the mouth shut"),
}
# Modifier words compete with head/jaw anchors when a clause is assigned ("at a slow pace" is no action).
MODIFIER_ANCHORS: dict[str, tuple[str, ...]] = {
    "speed_slow": ("slowly", "at a slow pace", "leisurely"),
    "speed_fast": ("quickly", "rapidly", "fast"),
    "amp_small": ("slightly", "a little", "subtly"),
    "amp_large": ("a lot", "strongly", "markedly", "deeply"),
    "count_1": ("once", "one time"),
    "count_2": ("twice", "two times"),
    "count_3": ("three times", "thrice"),
    "sequence": ("then", "and then", "after that", "first"),
    "subject": ("he", "she", "the person", "a man", "a woman"),
}
EMOTION_ANCHORS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "calm", "expressionless", "a neutral face", "keeps a neutral face",
                "keeps a straight face", "shows no emotion", "has a blank expression"),
    "happy": ("happy", "cheerful", "joyful", "a happy face", "smiles", "grins", "beams"),
    "sad": ("sad", "unhappy", "downcast", "a sad face", "frowns sadly", "makes a sad face", "sulks"),
    "angry": ("angry", "mad", "furious", "an angry face", "scowls", "glares angrily", "frowns angrily"),
    "surprised": ("surprised", "astonished", "shocked", "a surprised face", "gasps in surprise",
                  "raises the eyebrows in surprise", "looks on in surprise"),
    "disgusted": ("disgusted", "repulsed", "a disgusted face", "grimaces in disgust", "wrinkles the nose in disgust",
                  "makes a disgusted face"),
    "fearful": ("fearful", "scared", "afraid", "frightened", "a fearful face", "cringes in fear", "looks on in fear",
                "makes a frightened face"),
}
INTENSITY_ANCHORS: dict[str, tuple[str, ...]] = {
    "slight": ("slightly", "a little", "somewhat"),
    "moderate": ("looks", "is"),
    "strong": ("very", "extremely", "really", "intensely", "strongly"),
}
TIMING_ANCHORS: dict[str, tuple[str, ...]] = {
    "hold": ("the whole time", "throughout", "looks", "seems"),
    "gradual": ("gradually", "little by little", "over time", "progressively", "increasingly"),
    "sudden": ("suddenly", "abruptly", "all of a sudden"),
    "brief": ("briefly", "for a moment", "momentarily"),
}

ANCHORS: dict[str, dict[str, tuple[str, ...]]] = {
    "head": HEAD_ANCHORS, "jaw": JAW_ANCHORS, "modifier": MODIFIER_ANCHORS,
    "emotion": EMOTION_ANCHORS, "intensity": INTENSITY_ANCHORS, "timing": TIMING_ANCHORS,
}
KIND_GROUPS = {"motion": ("head", "jaw", "modifier"), "emotion": ("emotion", "intensity", "timing")}
HEAD_LABELS = tuple(HEAD_ANCHORS)
HEAD_MARGIN = 0.2  # see AnchorFeatures; chosen on training-split captions only (benchmarks/probe_text_features.py)
JAW_LABELS = tuple(JAW_ANCHORS)
EMOTION_LABELS = tuple(EMOTION_ANCHORS)

# ----------------------------------------------------------------------------- clauses
# Split at punctuation and at the connectives of the corpus's *training* wordings only (sequencers
# "then" / "after that", jaw phrases "while" / "with" / "keeping"); "and" alone is not a boundary
# ("up and down", "opens and closes"). Leading "and" / "then" / "first" / "also" are dropped.
_SPLIT = re.compile(
    r"\s*[,;:.!?]+\s*"
    r"|\s+(?:and\s+then|and\s+after\s+that|after\s+that|then|while|keeping|with)\b\s*",
    re.IGNORECASE)
_LEAD = re.compile(r"^(?:and|then|first|also)\b[\s,]*", re.IGNORECASE)


def split_clauses(text: str) -> list[str]:
    """Clauses of a prompt in order, without their connectives; empty pieces dropped.
    ``"he nods twice, then turns left while talking"`` -> ``["he nods twice", "turns left", "talking"]``."""
    out = []
    for piece in _SPLIT.split(text):
        piece = piece.strip()
        prev = None
        while piece and piece != prev:
            prev, piece = piece, _LEAD.sub("", piece).strip()
        if piece:
            out.append(piece)
    return out or [text.strip()]


# ----------------------------------------------------------------------------- features
class AnchorFeatures:
    """Fixed-size anchor-similarity features of prompts for one kind (``"motion"`` or ``"emotion"``).

    ``encoder``: a TextEncoder (``encode(list[str]).pooled`` unit vectors). ``clauses`` (motion
    only): add the per-clause slot features. A clause counts as a head action when its best head
    score is at least its best jaw score and at least its best modifier / subject score minus
    ``head_margin`` ("he nods twice" is an action although "twice" alone is a modifier). Results are
    cached per prompt (``cache_size`` LRU).
    """

    def __init__(self, encoder, kind: str = "motion", *, clauses: bool = True, head_margin: float = HEAD_MARGIN,
                 cache_size: int = 4096):
        if kind not in KIND_GROUPS:
            raise ValueError(f"kind must be one of {tuple(KIND_GROUPS)}, got {kind!r}")
        self.encoder, self.kind = encoder, kind
        self.clauses = bool(clauses) and kind == "motion"
        self.head_margin = float(head_margin)
        self.groups = KIND_GROUPS[kind]
        self.label_names: list[str] = []   # "group.label" per label-level column
        phrases: list[str] = []
        owner: list[int] = []
        for g in self.groups:
            for label, ps in ANCHORS[g].items():
                self.label_names.append(f"{g}.{label}")
                for p in ps:
                    phrases.append(p)
                    owner.append(len(self.label_names) - 1)
        self.phrases = tuple(phrases)
        self._owner = np.asarray(owner)
        self._anchor = self._encode(list(self.phrases))  # (K, D)
        self._group_of = np.array([n.split(".", 1)[0] for n in self.label_names])
        self._head = np.flatnonzero(self._group_of == "head")
        self._jaw = np.flatnonzero(self._group_of == "jaw")
        self._mod = np.flatnonzero(self._group_of == "modifier")
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        n_lab = len(self.label_names)
        self.dim = n_lab + (2 * len(self._head) + 1 + len(self._jaw) if self.clauses else 0)

    # -- helpers
    def _encode(self, texts: list[str]) -> np.ndarray:
        pooled = self.encoder.encode(texts).pooled.detach().float().cpu().numpy()
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-8)

    def label_scores(self, emb: np.ndarray) -> np.ndarray:
        """(N, n_labels): per label, the max cosine similarity of ``emb`` (N, D) over its phrases."""
        sims = emb @ self._anchor.T  # (N, K)
        out = np.full((emb.shape[0], len(self.label_names)), -1.0, dtype=np.float32)
        for j in range(len(self.label_names)):
            out[:, j] = sims[:, self._owner == j].max(axis=1)
        return out

    def _actions(self, clause_scores: np.ndarray) -> list[int]:
        """Indices of the head-action clauses among a prompt's (C, n_labels) clause scores."""
        head = clause_scores[:, self._head].max(axis=1)
        jaw_best = clause_scores[:, self._jaw].max(axis=1)
        mod = clause_scores[:, self._mod].max(axis=1) if len(self._mod) else np.full_like(head, -1.0)
        return [c for c in range(len(head)) if head[c] >= jaw_best[c] and head[c] >= mod[c] - self.head_margin]

    def action_clauses(self, prompt: str) -> list[str]:
        """The clauses of ``prompt`` read as head actions, in order (motion kind)."""
        clauses = split_clauses(prompt)
        return [clauses[c] for c in self._actions(self.label_scores(self._encode(clauses)))]

    def slot_embeddings(self, prompts: str | Sequence[str]) -> np.ndarray:
        """(B, 2, D) float32 pooled encoder embeddings of each prompt's first and second head-action
        clause (zeros where there is none; motion kind). The best-generalising motion representation
        of the probe study when concatenated with the sentence embedding: a denoiser retrained on
        it sees the two segments apart instead of one blurred sentence vector."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        acts = [self.action_clauses(p)[:2] for p in prompts]
        flat = sorted({c for a in acts for c in a})
        emb = dict(zip(flat, self._encode(flat))) if flat else {}
        out = np.zeros((len(prompts), 2, self._anchor.shape[1]), np.float32)
        for i, a in enumerate(acts):
            for k, c in enumerate(a):
                out[i, k] = emb[c]
        return out

    def _slots(self, clause_scores: np.ndarray) -> np.ndarray:
        """Slot features from the (C, n_labels) scores of one prompt's clauses."""
        action = self._actions(clause_scores)
        nh = len(self._head)
        a = clause_scores[action[0], self._head] if action else np.zeros(nh, np.float32)
        b = clause_scores[action[1], self._head] if len(action) > 1 else np.zeros(nh, np.float32)
        jaw = clause_scores[:, self._jaw].max(axis=0)
        return np.concatenate([a, b, [float(len(action) > 1)], jaw]).astype(np.float32)

    def _compute(self, prompts: list[str]) -> np.ndarray:
        sent = self.label_scores(self._encode(prompts))
        if not self.clauses:
            return sent
        parts = [split_clauses(p) for p in prompts]
        flat = sorted({c for cs in parts for c in cs})
        scores = dict(zip(flat, self.label_scores(self._encode(flat))))
        slots = np.stack([self._slots(np.stack([scores[c] for c in cs])) for cs in parts])
        return np.concatenate([sent, slots], axis=1)

    # -- public
    def features(self, prompts: str | Sequence[str]) -> np.ndarray:
        """(B, dim) float32 anchor features (cached per prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._lock:
            missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            rows = self._compute(missing)
            with self._lock:
                for p, r in zip(missing, rows):
                    self._cache[p] = r
                while len(self._cache) > max(self.cache_size, len(prompts)):
                    self._cache.popitem(last=False)
        with self._lock:
            out = np.stack([self._cache[p] for p in prompts])
            for p in prompts:
                self._cache.move_to_end(p)
        return out.copy()

    def decode(self, prompts: str | Sequence[str], jaw_threshold: float = 0.5) -> list[dict]:
        """Zero-shot labels from the anchor scores (no training): for motion ``{"segments": [head
        label, ...], "jaw": ...}`` (jaw is "none" unless a talk / open jaw anchor scores over
        ``jaw_threshold``), for emotion ``{"emotion": ...}``."""
        feats = self.features(prompts)
        n_lab = len(self.label_names)
        out = []
        for f in feats:
            if self.kind == "emotion":
                emo = [i for i, n in enumerate(self.label_names) if n.startswith("emotion.")]
                out.append({"emotion": self.label_names[emo[int(np.argmax(f[emo]))]].split(".", 1)[1]})
                continue
            if not self.clauses:
                out.append({"segments": [HEAD_LABELS[int(np.argmax(f[self._head]))]], "jaw": "none"})
                continue
            nh = len(self._head)
            s = f[n_lab:]
            a, b, two, jaw = s[:nh], s[nh:2 * nh], s[2 * nh], s[2 * nh + 1:]
            segs = [HEAD_LABELS[int(np.argmax(a if a.any() else f[self._head]))]]
            if two > 0.5:
                segs.append(HEAD_LABELS[int(np.argmax(b))])
            moving = [i for i, j in enumerate(JAW_LABELS) if j != "none"]
            k = moving[int(np.argmax(jaw[moving]))]
            out.append({"segments": segs, "jaw": JAW_LABELS[k] if jaw[k] > jaw_threshold else "none"})
        return out


def head_label(action: str, direction: str | None) -> str:
    """The HEAD_ANCHORS key of a motion segment (``("turn", "left")`` -> ``"turn_left"``)."""
    return f"{action}_{direction}" if direction else action


__all__ = ["ANCHORS", "HEAD_ANCHORS", "JAW_ANCHORS", "MODIFIER_ANCHORS", "EMOTION_ANCHORS", "INTENSITY_ANCHORS",
           "TIMING_ANCHORS", "HEAD_LABELS", "JAW_LABELS", "EMOTION_LABELS", "AnchorFeatures", "split_clauses",
           "head_label"]
