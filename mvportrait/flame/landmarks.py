"""iBUG-68 landmark layout and embedding landmarks on a mesh (face index + barycentrics).

iBUG-68 order (0-based here; the iBUG docs count from 1): 0-16 jaw contour from the subject's
right (image left in a frontal view) to the left, 17-21 right brow (outer -> inner), 22-26 left
brow (inner -> outer), 27-30 nose bridge (top -> tip), 31-35 nostril base (right -> left), 36-41
right eye (outer corner, two upper lid, inner corner, two lower lid), 42-47 left eye (inner corner,
two upper, outer corner, two lower), 48-59 outer lip (right corner, upper lip right -> left, left
corner, lower lip left -> right), 60-67 inner lip (right corner, upper, left corner, lower).
"""
from __future__ import annotations

import numpy as np

IBUG_GROUPS = {
    "jaw": range(0, 17),
    "right_brow": range(17, 22),
    "left_brow": range(22, 27),
    "nose_bridge": range(27, 31),
    "nostrils": range(31, 36),
    "right_eye": range(36, 42),
    "left_eye": range(42, 48),
    "outer_lip": range(48, 60),
    "inner_lip": range(60, 68),
}
NUM_LANDMARKS = 68


def ray_mesh_intersect(origins: np.ndarray, dirs: np.ndarray, verts: np.ndarray, faces: np.ndarray,
                       pick: str = "first"):
    """Intersect R rays with a triangle mesh (Moller-Trumbore, float64, vectorised over faces).

    origins, dirs (R, 3); verts (V, 3); faces (F, 3). ``pick`` = "first" (smallest t > 0) or
    "last" (largest t > 0). Returns (face index (R,), barycentrics (R, 3), t (R,)); raises
    ValueError if a ray misses the mesh.
    """
    v0, v1, v2 = (verts[faces[:, k]].astype(np.float64) for k in range(3))
    e1, e2 = v1 - v0, v2 - v0
    out_f = np.empty(len(origins), np.int64)
    out_b = np.empty((len(origins), 3))
    out_t = np.empty(len(origins))
    for r, (o, d) in enumerate(zip(origins.astype(np.float64), dirs.astype(np.float64))):
        p = np.cross(d, e2)
        det = (e1 * p).sum(1)
        ok = np.abs(det) > 1e-15
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        s = o - v0
        u = (s * p).sum(1) * inv
        q = np.cross(s, e1)
        v = (q @ d) * inv
        t = (q * e2).sum(1) * inv
        hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
        if not hit.any():
            raise ValueError(f"ray {r} (origin {o.round(4).tolist()}, dir {d.round(3).tolist()}) misses the mesh")
        idx = np.flatnonzero(hit)
        k = idx[np.argmin(t[idx])] if pick == "first" else idx[np.argmax(t[idx])]
        out_f[r], out_t[r] = k, t[k]
        out_b[r] = (1 - u[k] - v[k], u[k], v[k])
    return out_f, out_b, out_t


def barycentric_points(verts: np.ndarray, faces: np.ndarray, face_idx: np.ndarray, bary: np.ndarray):
    """Points (L, 3) on the mesh from a (face index, barycentric) embedding."""
    return (verts[faces[face_idx]] * bary[..., None]).sum(1)
