"""Deterministic labelling of expression sequences from the landmark geometry of a FLAME head.

:func:`analyse_emotion` runs the head (the synthetic head, seed 0, by default) with zero pose
and the expression sequence, takes the 68 iBUG landmarks and measures, per frame and in mm
relative to the neutral face:

==========  =======================================================================
feature     measurement
==========  =======================================================================
corner      mouth-corner height (48, 54) above the mouth centre (51, 57)
width       mouth width (48 -> 54)
open        inner-lip gap (62 - 66)
outer_h     outer-lip height (51 - 57)
brow_out    outer-brow height (17, 26) above the face sides (0, 16)
brow_in     inner-brow height (21, 22) above the face sides
brow_gap    distance between the inner brows (21 -> 22)
eye         eye opening (upper lids 37, 38, 43, 44 above lower lids 41, 40, 47, 46)
nose_lip    nose base (33) above the upper lip (51)
nostril     nostril height (31-35) above the face sides
==========  =======================================================================

The features are divided by their spread on neutral faces (``FEATURE_SCALE``), the apex frames
are those whose feature magnitude (eye opening left out, so blinks do not count) is within
80 % of the clip's peak, and the median over the apex frames is classified: for each emotion
prototype (``PROTOTYPES``: the mean feature vector of that emotion at moderate intensity) the
projection onto its direction and the residual off it are computed; the emotion with the
smallest residual wins, unless no projection reaches ``NEUTRAL_PROJECTION`` (neutral).
Intensity = projection / prototype length (slight < 0.73 < moderate < 1.32 < strong); timing
from the envelope (projection per frame). Blinks = short dips of the eye opening of more than
5 mm below the lower of the medians of the 0.4 s before and after.

``PROTOTYPES`` and ``FEATURE_SCALE`` are fixed numbers fitted once with
:func:`fit_parameters` on clips of :mod:`mvportrait.data.emotion` (a test re-fits them and
checks they still agree), so nothing is trained at import.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from mvportrait.data.emotion import EMOTIONS, INTENSITIES, EmotionLabel

FEATURES = ("corner", "width", "open", "outer_h", "brow_out", "brow_in", "brow_gap", "eye", "nose_lip", "nostril")

# ---- fixed parameters (from fit_parameters(seed=0, n=200); see the module docstring) ----
FEATURE_SCALE = np.array([0.263, 0.602, 0.199, 0.16, 0.207, 0.279, 0.15, 0.421, 0.15, 0.15])
PROTOTYPES = {
    "happy": np.array([4.853, 6.107, 0.011, 0.212, -0.017, -0.02, -0.008, -2.645, -0.462, 0.214]),
    "sad": np.array([-4.316, 2.052, -0.003, -0.362, 0.014, 3.463, 0.005, 0.314, 0.441, -0.003]),
    "angry": np.array([-0.044, -0.046, -1.384, -0.366, -0.072, -3.407, -3.681, -0.677, 0.143, 0.042]),
    "surprised": np.array([-0.103, -0.048, 2.884, 1.691, 5.362, 5.423, 0.01, 4.896, -0.849, 0.012]),
    "disgusted": np.array([-2.366, 0.447, 2.268, 3.506, -0.049, -2.122, -1.322, -0.367, -3.265, 0.67]),
    "fearful": np.array([-0.733, 8.147, -0.005, -0.03, 3.203, 6.448, -0.0, 4.1, 0.083, -0.001]),
}
SCALE_FLOOR_MM = 0.15  # no feature is trusted to better than this
NEUTRAL_PROJECTION = 6.8
INTENSITY_EDGES = (0.73, 1.32)
APEX_FRACTION = 0.8
BLINK_DROP_MM = 5.0
BLINK_WINDOW_S = 0.4


@dataclass(frozen=True)
class EmotionAnalysis:
    """What :func:`analyse_emotion` found."""

    emotion: str
    intensity: str | None
    timing: str
    blinks: int
    apex: tuple[int, int]           # first and last apex frame
    features: dict                  # apex median of every feature (mm, relative to neutral)
    scores: dict                    # residual per emotion (whitened units; lower is better)


# ---------------------------------------------------------------------------- geometry
@functools.lru_cache(maxsize=4)
def _default_head(seed: int = 0):
    from mvportrait.flame.synthetic import synthetic_head

    return synthetic_head(seed).model


_BASIS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {n_expr: basis}


def _landmark_basis(model, n_expr: int) -> tuple[np.ndarray, np.ndarray]:
    """Rest landmarks (68, 3) and per-coefficient landmark offsets (n_expr, 68, 3), float64.

    Obtained by running the model forward (zero pose, zero shape) on the zero vector and the
    unit expression vectors: with zero pose FLAME is linear in the expression, so
    ``rest + expr @ basis`` equals the forward pass for any expression (checked in a test).
    """
    per_model = _BASIS_CACHE.setdefault(model, {})
    if n_expr not in per_model:
        from mvportrait.flame.params import FlameParams

        if n_expr > model.n_expr:
            raise ValueError(f"expression has {n_expr} coefficients, the head model has {model.n_expr}")
        eye = torch.zeros(1, n_expr + 1, n_expr, dtype=torch.float64)
        eye[0, 1:] = torch.eye(n_expr, dtype=torch.float64)
        with torch.no_grad():
            lm = model.to(dtype=torch.float64)(FlameParams(shape=torch.zeros(1, 1, dtype=torch.float64),
                                                           expression=eye)).landmarks
        if lm is None:
            raise ValueError(f"head model {model.name!r} has no landmark embedding")
        lm = lm[0].cpu().numpy()
        per_model[n_expr] = (lm[0], lm[1:] - lm[0])
    return per_model[n_expr]


def expression_landmarks(expression, model=None, exact: bool = False) -> np.ndarray:
    """(T, 68, 3) landmarks of the head at zero pose for an expression sequence (T, n_expr).

    ``exact=True`` runs the full forward pass on the whole sequence instead of the (equal, much
    faster) linear landmark basis.
    """
    expr = _check_expression(expression)
    model = model if model is not None else _default_head()
    if exact:
        from mvportrait.flame.params import FlameParams

        e = torch.as_tensor(expr, dtype=model.dtype)[None]
        with torch.no_grad():
            out = model(FlameParams(shape=torch.zeros(1, 1, dtype=model.dtype), expression=e))
        return out.landmarks[0].double().cpu().numpy()
    rest, basis = _landmark_basis(model, expr.shape[1])
    return rest[None] + np.einsum("te,elc->tlc", expr, basis)


def _check_expression(expression) -> np.ndarray:
    if hasattr(expression, "detach"):
        expression = expression.detach().cpu().numpy()
    expr = np.asarray(expression, dtype=np.float64)
    if expr.ndim == 3 and expr.shape[0] == 1:
        expr = expr[0]
    if expr.ndim != 2 or expr.shape[0] < 1 or expr.shape[1] < 1:
        raise ValueError(f"expression must be (T, n_expr) with T >= 1, got shape {expr.shape}")
    if not np.isfinite(expr).all():
        raise ValueError("expression contains NaN or Inf")
    return expr


def landmark_features(lmk: np.ndarray) -> np.ndarray:
    """(..., 68, 3) landmarks (metres) -> (..., 10) raw features in mm (order of ``FEATURES``)."""
    x, y = lmk[..., 0], lmk[..., 1]
    ref = (y[..., 0] + y[..., 16]) / 2
    feats = [
        (y[..., 48] + y[..., 54]) / 2 - (y[..., 51] + y[..., 57]) / 2,
        x[..., 54] - x[..., 48],
        y[..., 62] - y[..., 66],
        y[..., 51] - y[..., 57],
        (y[..., 17] + y[..., 26]) / 2 - ref,
        (y[..., 21] + y[..., 22]) / 2 - ref,
        x[..., 22] - x[..., 21],
        (y[..., 37] + y[..., 38] - y[..., 41] - y[..., 40] + y[..., 43] + y[..., 44] - y[..., 47] - y[..., 46]) / 4,
        y[..., 33] - y[..., 51],
        y[..., 31:36].mean(-1) - ref,
    ]
    return np.stack(feats, -1) * 1000.0


def expression_features(expression, model=None) -> np.ndarray:
    """(T, 10) features in mm relative to the neutral face of the same head."""
    expr = _check_expression(expression)
    model = model if model is not None else _default_head()
    rest, _ = _landmark_basis(model, expr.shape[1])
    return landmark_features(expression_landmarks(expr, model)) - landmark_features(rest)


# ------------------------------------------------------------------------- classifier
def _classify(z: np.ndarray) -> tuple[str, float, dict]:
    """Emotion, projection ratio (intensity scale) and residuals for whitened features z (10,)."""
    scores, ratios = {}, {}
    for emo, proto in PROTOTYPES.items():
        p = proto / FEATURE_SCALE
        norm = np.linalg.norm(p)
        a = float(z @ p / norm)
        scores[emo] = float(np.linalg.norm(z - a * p / norm)) if a > 0 else float("inf")
        ratios[emo] = a / norm
    proj = max((ratios[e] * np.linalg.norm(PROTOTYPES[e] / FEATURE_SCALE) for e in PROTOTYPES), default=0.0)
    if proj < NEUTRAL_PROJECTION:
        return "neutral", 0.0, scores
    best = min(scores, key=scores.get)
    return best, ratios[best], scores


def _timing(env: np.ndarray, fps: float) -> str:
    """hold / gradual / sudden / brief from the per-frame projection on the found emotion:
    brief = back near neutral at the end, hold = already near the peak at the start, otherwise
    sudden if the steepest 0.3 s covers most of the rise, else gradual."""
    e = env / max(np.percentile(env, 95), 1e-9)
    k = max(1, round(0.2 * fps))
    start, end = float(np.median(e[:k])), float(np.median(e[-k:]))
    if end < 0.4:
        return "brief"
    if start > 0.6:
        return "hold"
    w = max(1, round(0.3 * fps))
    if len(e) <= w:
        return "sudden"
    steepest = float((e[w:] - e[:-w]).max())
    return "sudden" if steepest > 0.65 * max(end - start, 1e-9) else "gradual"


def count_blinks(expression=None, fps: float = 25.0, model=None, *, landmarks=None) -> int:
    """Number of blinks: dips of the eye opening deeper than 5 mm below its local level (the lower
    of the medians over the 0.4 s before and after). Give ``expression`` (T, n_expr) or
    ``landmarks`` (T, 68, 3)."""
    if landmarks is None:
        if expression is None:
            raise ValueError("count_blinks needs an expression sequence or landmarks")
        landmarks = expression_landmarks(expression, model)
    eye = landmark_features(np.asarray(landmarks, dtype=np.float64))[:, FEATURES.index("eye")]
    w = max(2, round(BLINK_WINDOW_S * fps))
    t_len = len(eye)
    pad = np.concatenate([np.full(w, eye[0]), eye, np.full(w, eye[-1])])
    windows = np.lib.stride_tricks.sliding_window_view(pad, w)  # windows[i] = pad[i:i + w]
    before = np.median(windows[:t_len], axis=1)
    after = np.median(windows[w + 1:w + 1 + t_len], axis=1)
    closed = (np.minimum(before, after) - eye) > BLINK_DROP_MM
    starts = np.flatnonzero(closed[1:] & ~closed[:-1]) + 1
    return int(len(starts) + int(closed[0]))


def analyse_emotion(expression, fps: float = 25.0, model=None) -> EmotionAnalysis:
    """Label an expression sequence (T, n_expr) (numpy or torch): emotion, intensity, timing,
    blink count. ``model`` is a FlameModel with landmarks (default: the synthetic head, seed 0)."""
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps!r}")
    expr = _check_expression(expression)
    model = model if model is not None else _default_head()
    lmk = expression_landmarks(expr, model)
    rest, _ = _landmark_basis(model, expr.shape[1])
    feats = landmark_features(lmk) - landmark_features(rest)
    z = feats / FEATURE_SCALE
    no_eye = np.delete(z, FEATURES.index("eye"), axis=1)
    mag = np.linalg.norm(no_eye, axis=1)
    peak = np.percentile(mag, 95)
    apex = np.flatnonzero(mag >= APEX_FRACTION * peak)
    z_apex = np.median(z[apex], axis=0)
    emotion, ratio, scores = _classify(z_apex)
    if emotion == "neutral":
        intensity, timing = None, "hold"
    else:
        intensity = INTENSITIES[0] if ratio < INTENSITY_EDGES[0] else \
            INTENSITIES[1] if ratio < INTENSITY_EDGES[1] else INTENSITIES[2]
        p = PROTOTYPES[emotion] / FEATURE_SCALE
        timing = _timing(np.delete(z, FEATURES.index("eye"), axis=1) @ np.delete(p, FEATURES.index("eye")), fps)
    return EmotionAnalysis(emotion=emotion, intensity=intensity, timing=timing,
                           blinks=count_blinks(fps=fps, landmarks=lmk), apex=(int(apex[0]), int(apex[-1])),
                           features=dict(zip(FEATURES, np.median(feats[apex], axis=0).round(4).tolist())),
                           scores=scores)


def compare(label: EmotionLabel, found: EmotionAnalysis) -> dict[str, bool]:
    """Agreement of an analysis with a ground-truth label: emotion, intensity, timing, blinks."""
    out = {"emotion": label.emotion == found.emotion,
           "intensity": label.emotion == found.emotion and label.intensity == found.intensity,
           "timing": label.emotion == found.emotion and label.timing == found.timing,
           "blinks": len(label.blinks) == found.blinks}
    return out


# ------------------------------------------------------------------------------- fit
def fit_parameters(seed: int = 0, n: int = 200, frames: int = 50, model=None) -> dict:
    """Re-fit ``FEATURE_SCALE`` (std of apex features on neutral clips, at least
    ``SCALE_FLOOR_MM``) and ``PROTOTYPES`` (mean
    apex features of each emotion at moderate intensity, timing hold, no blinks) from the
    generator. Used once to write the constants above, and by a test to check they are current."""
    from mvportrait.data.emotion import make_emotion

    rng = np.random.default_rng(seed)
    model = model if model is not None else _default_head()
    out = {}
    for emo in EMOTIONS:
        rows = []
        for _ in range(n):
            _, e = make_emotion(emo, None if emo == "neutral" else "moderate", "hold", rng, frames, 25.0,
                                blinks=False)
            feats = expression_features(e, model)
            rows.append(np.median(feats, axis=0))
        rows = np.array(rows)
        out[emo] = np.maximum(rows.std(0), SCALE_FLOOR_MM) if emo == "neutral" else rows.mean(0)
    return {"FEATURE_SCALE": out.pop("neutral"), "PROTOTYPES": out}


__all__ = ["FEATURES", "EmotionAnalysis", "analyse_emotion", "compare", "count_blinks", "expression_features",
           "expression_landmarks", "fit_parameters", "landmark_features"]
