"""Blendshapes + linear blend skinning (LBS) of a FLAME-format head.

Math (FLAME / SMPL, the ``smplx`` package's ``lbs`` is the public reference)::

    v_shaped = v_template + dirs . c                      c = [beta; psi]       (N, V, 3)
    J        = J_regressor . v_shaped                                           (N, J, 3)
    R_j      = rodrigues(pose_j)                                                (N, J, 3, 3)
    f        = flatten(R_1.. - I)                         pose feature          (N, 9(J-1))
    v_posed  = v_shaped + posedirs . f                                          (N, V, 3)
    G_j      = G_parent(j) [R_j | J_j - J_parent(j)]      (root: [R_0 | J_0])
    A_j      = [R^G_j | t^G_j - R^G_j J_j]                rest joint removed
    v        = (sum_j w_vj A_j) [v_posed; 1] + translation

Tensors: ``coeffs`` (N, K) float, ``pose`` (N, 3J) axis-angle in joint order, ``v_template``
(V, 3), ``dirs`` (V, 3, K), ``posedirs`` (V, 3, 9(J-1)), ``j_regressor`` (J, V), ``parents``
(J,) int64 with ``parents[0] == -1`` and ``parents[j] < j``, ``weights`` (V, J),
``translation`` (N, 3) or None. All float tensors share one dtype and device.

Cost per mesh (reference): blendshapes 2VK + correctives 2V*9(J-1) + skinning ~ 2V(16J + 12)
FLOPs; it reads ``dirs`` (12VK bytes in fp32) once per batch, which dominates for K = 400.

This module holds the reference (``lbs_ref``) and the public, validating entry point
(``lbs``). Fast paths (Triton / C++) dispatch from ``lbs`` and are checked against ``lbs_ref``.
"""
from __future__ import annotations

import torch

__all__ = ["rodrigues", "lbs_ref", "lbs", "batch_rigid_transform"]


def rodrigues(axis_angle: torch.Tensor) -> torch.Tensor:
    """Axis-angle (..., 3) -> rotation matrices (..., 3, 3).

    ``R = I + a(t) K + b(t) K^2`` with ``K = skew(r)``, ``t = |r|``, ``a = sin t / t``,
    ``b = (1 - cos t) / t^2``; Taylor series near ``t = 0`` keep it exact and differentiable.
    """
    if axis_angle.shape[-1] != 3:
        raise ValueError(f"axis-angle tensors must end in 3, got shape {tuple(axis_angle.shape)}")
    r = axis_angle
    t2 = (r * r).sum(-1, keepdim=True)
    small = t2 < (1e-4 if r.dtype == torch.float64 else 1e-2) ** 2
    safe_t = torch.where(small, torch.ones_like(t2), t2).sqrt()  # no sqrt(0): finite gradients
    a = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(safe_t) / safe_t)
    b = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, (1 - torch.cos(safe_t)) / (safe_t * safe_t))
    x, y, z = r.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*r.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=r.dtype, device=r.device).expand_as(k)
    return eye + a[..., None] * k + b[..., None] * (k @ k)


def batch_rigid_transform(rot: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor):
    """Kinematic chain. rot (N, J, 3, 3), joints (N, J, 3) rest positions, parents (J,).

    Returns (posed_joints (N, J, 3), A (N, J, 4, 4)) where A maps rest-pose points to posed
    points for each joint (rest joint position already removed).
    """
    n, nj = joints.shape[:2]
    par = [int(p) for p in parents.tolist()]
    rel = joints.clone()
    rel[:, 1:] = joints[:, 1:] - joints[:, par[1:]]
    local = torch.zeros(n, nj, 4, 4, dtype=rot.dtype, device=rot.device)
    local[:, :, :3, :3] = rot
    local[:, :, :3, 3] = rel
    local[:, :, 3, 3] = 1
    chain = [local[:, 0]]
    for j in range(1, nj):
        chain.append(chain[par[j]] @ local[:, j])
    g = torch.stack(chain, dim=1)  # (N, J, 4, 4)
    posed_joints = g[:, :, :3, 3]
    a = g.clone()
    a[:, :, :3, 3] = g[:, :, :3, 3] - (g[:, :, :3, :3] @ joints[..., None])[..., 0]
    return posed_joints, a


def lbs_ref(coeffs, pose, v_template, dirs, posedirs, j_regressor, parents, weights, translation=None):
    """Plain-PyTorch FLAME forward. Returns (vertices (N, V, 3), posed joints (N, J, 3))."""
    n = coeffs.shape[0]
    nj = j_regressor.shape[0]
    v_shaped = v_template + torch.einsum("vck,nk->nvc", dirs, coeffs)  # (N, V, 3)
    joints = torch.einsum("jv,nvc->njc", j_regressor, v_shaped)  # (N, J, 3)
    rot = rodrigues(pose.reshape(n, nj, 3))  # (N, J, 3, 3)
    eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
    pose_feature = (rot[:, 1:] - eye).reshape(n, -1)  # (N, 9(J-1))
    v_posed = v_shaped + torch.einsum("vcp,np->nvc", posedirs, pose_feature)
    posed_joints, a = batch_rigid_transform(rot, joints, parents)
    t = torch.einsum("vj,njab->nvab", weights, a)  # (N, V, 4, 4)
    verts = (t[..., :3, :3] @ v_posed[..., None])[..., 0] + t[..., :3, 3]
    if translation is not None:
        verts = verts + translation[:, None, :]
        posed_joints = posed_joints + translation[:, None, :]
    return verts, posed_joints


def _check(name, t, shape, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def lbs(coeffs, pose, v_template, dirs, posedirs, j_regressor, parents, weights, translation=None):
    """Validating entry point; see the module docstring for the math and shapes."""
    _check("v_template", v_template, (None, 3))
    nv = v_template.shape[0]
    dt, dev = v_template.dtype, v_template.device
    _check("j_regressor", j_regressor, (None, nv), dt, dev)
    nj = j_regressor.shape[0]
    _check("coeffs", coeffs, (None, dirs.shape[-1] if dirs.dim() == 3 else None), dt, dev)
    n = coeffs.shape[0]
    _check("dirs", dirs, (nv, 3, coeffs.shape[1]), dt, dev)
    _check("pose", pose, (n, 3 * nj), dt, dev)
    _check("posedirs", posedirs, (nv, 3, 9 * (nj - 1)), dt, dev)
    _check("weights", weights, (nv, nj), dt, dev)
    _check("parents", parents, (nj,))
    if translation is not None:
        _check("translation", translation, (n, 3), dt, dev)
    par = parents.tolist()
    if par[0] != -1 or any(not (0 <= p < j) for j, p in enumerate(par) if j > 0):
        raise ValueError(f"parents must be topologically sorted with parents[0] == -1, got {par}")
    return lbs_ref(coeffs, pose, v_template, dirs, posedirs, j_regressor, parents, weights, translation)
