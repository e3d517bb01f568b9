"""Appearance model of the synthetic head: per-identity colours, background and light.

``Appearance.sample(seed)`` draws skin tone, hair colour and hairline, brow, lip and iris colours,
a background colour and a light direction; ``vertex_colors(head, appearance)`` paints the
template (per-vertex RGB in [0, 1]) using the head's region weights. Used to render shaded target
images for training data and the demo.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mvportrait.flame.synthetic import SyntheticHead, _smoothstep

SKIN = np.array([(0.96, 0.80, 0.69), (0.89, 0.69, 0.56), (0.78, 0.56, 0.42), (0.60, 0.41, 0.29),
                 (0.42, 0.27, 0.18)])
HAIR = np.array([(0.06, 0.05, 0.05), (0.20, 0.12, 0.07), (0.38, 0.24, 0.13), (0.75, 0.62, 0.38),
                 (0.55, 0.25, 0.10), (0.62, 0.62, 0.62)])
IRIS = np.array([(0.30, 0.18, 0.08), (0.25, 0.45, 0.70), (0.30, 0.50, 0.30), (0.45, 0.38, 0.20),
                 (0.45, 0.50, 0.55)])
SCLERA = np.array([0.93, 0.92, 0.90])
PUPIL = np.array([0.04, 0.03, 0.03])
MOUTH = np.array([0.28, 0.06, 0.07])


@dataclass(frozen=True)
class Appearance:
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hairline_front: float  # y of the hairline above the forehead (metres)
    hairline_back: float  # y of the hairline at the nape
    bald: bool
    brows: tuple[float, float, float]
    lips: tuple[float, float, float]
    iris: tuple[float, float, float]
    background: tuple[float, float, float]
    light_dir: tuple[float, float, float]  # unit vector toward the light, world space

    @staticmethod
    def sample(seed: int) -> "Appearance":
        """A random identity appearance, deterministic for the seed."""
        rng = np.random.default_rng([int(seed), 7919])
        t = rng.uniform(0, len(SKIN) - 1)
        i = int(min(t, len(SKIN) - 2))
        skin = SKIN[i] + (t - i) * (SKIN[i + 1] - SKIN[i])
        skin = np.clip(skin * rng.uniform(0.95, 1.05, 3), 0, 1)
        hair = np.clip(HAIR[rng.integers(len(HAIR))] * rng.uniform(0.85, 1.15), 0, 1)
        brows = np.clip(0.5 * hair + 0.5 * np.minimum(hair, 0.25), 0, 1)
        lips = np.clip(skin * np.array([0.88, 0.58, 0.58]), 0, 1)
        iris = IRIS[rng.integers(len(IRIS))]
        bg = rng.uniform(0.15, 0.85, 3)
        light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.1, 0.7), 1.0])
        light /= np.linalg.norm(light)
        return Appearance(skin=tuple(skin), hair=tuple(hair), hairline_front=float(rng.uniform(0.078, 0.098)),
                          hairline_back=float(rng.uniform(-0.075, -0.02)), bald=bool(rng.random() < 0.08),
                          brows=tuple(brows), lips=tuple(lips), iris=tuple(iris), background=tuple(bg),
                          light_dir=tuple(light))

    @staticmethod
    def default() -> "Appearance":
        """The fixed appearance used by the demo."""
        return Appearance(skin=(0.87, 0.68, 0.55), hair=(0.20, 0.12, 0.07), hairline_front=0.088,
                          hairline_back=-0.05, bald=False, brows=(0.16, 0.10, 0.06), lips=(0.76, 0.40, 0.38),
                          iris=(0.25, 0.45, 0.70), background=(0.22, 0.25, 0.30),
                          light_dir=tuple(np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])))


def hair_weight(template: np.ndarray, app: Appearance) -> np.ndarray:
    """(V,) soft hair mask: above a hairline that runs from the forehead to the nape."""
    x, y, z = template[:, 0], template[:, 1], template[:, 2]
    c = z / (np.hypot(x, z) + 1e-9)  # 1 at the front, -1 at the back
    line = app.hairline_back + (app.hairline_front - app.hairline_back) * _smoothstep(-0.9, 0.75, c)
    side = np.exp(-0.5 * (c / 0.35) ** 2)  # the hairline rises over the ears
    line = line + 0.035 * side
    return _smoothstep(line - 0.008, line + 0.008, y)


def vertex_colors(head: SyntheticHead, app: Appearance) -> np.ndarray:
    """(V, 3) float32 RGB in [0, 1] for the head's template vertices."""
    v = head.template
    reg = head.regions
    col = np.tile(np.asarray(app.skin), (len(v), 1))
    col = col * (1 - 0.06 * reg["front_face"][:, None] * np.array([0, 1, 1]))  # a little warmer face
    col = col * (1 - 0.12 * reg["ears"][:, None]) + 0.12 * reg["ears"][:, None] * np.array([0.85, 0.5, 0.45])
    lips = reg["lips"][:, None]
    col = col * (1 - lips) + lips * np.asarray(app.lips)
    brows = reg["brows"][:, None]
    col = col * (1 - brows) + brows * np.asarray(app.brows)
    if not app.bald:
        h = (hair_weight(v, app) * (1 - reg["ears"]) * (~head.is_eye))[:, None]
        col = col * (1 - h) + h * np.asarray(app.hair)
    inside = reg["mouth_inside"][:, None]
    col = col * (1 - inside) + inside * MOUTH
    eye = head.is_eye
    polar = head.eye_polar[eye]
    iris_w = 1 - _smoothstep(0.45, 0.6, polar)
    pupil_w = 1 - _smoothstep(0.0, 0.2, polar)
    eye_col = SCLERA * (1 - iris_w[:, None]) + iris_w[:, None] * np.asarray(app.iris)
    eye_col = eye_col * (1 - pupil_w[:, None]) + pupil_w[:, None] * PUPIL
    col[eye] = eye_col
    return np.clip(col, 0, 1).astype(np.float32)
