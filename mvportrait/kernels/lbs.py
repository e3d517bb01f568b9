"""Blendshapes + linear blend skinning (LBS) of a FLAME-format head, and posed vertex normals.

Math (FLAME / SMPL, the ``smplx`` package's ``lbs`` is the public reference)::

    v_shaped = v_template + dirs . c                      c = [beta; psi]       (N, V, 3)
    J        = J_regressor . v_shaped                                           (N, J, 3)
    R_j      = rodrigues(pose_j)                                                (N, J, 3, 3)
    f        = flatten(R_1.. - I)                         pose feature          (N, 9(J-1))
    v_posed  = v_shaped + posedirs . f                                          (N, V, 3)
    G_j      = G_parent(j) [R_j | J_j - J_parent(j)]      (root: [R_0 | J_0])
    A_j      = [R^G_j | t^G_j - R^G_j J_j]                rest joint removed
    v        = (sum_j w_vj A_j) [v_posed; 1] + translation
    n_v      = normalise(sum over faces f of v: (p1 - p0) x (p2 - p0))    area-weighted normals

Tensors: ``coeffs`` (N, K) float, ``pose`` (N, 3J) axis-angle in joint order, ``v_template``
(V, 3), ``dirs`` (V, 3, K), ``posedirs`` (V, 3, P = 9(J-1)), ``j_regressor`` (J, V),
``parents`` (J,) int64 with ``parents[0] == -1`` and ``parents[j] < j``, ``weights`` (V, J),
``translation`` (N, 3) or None. All float tensors share one dtype and device. Outputs: vertices
(N, V, 3) and posed joints (N, J, 3) in that dtype, contiguous; normals (N, V, 3) when asked.

Three implementations, chosen by ``impl`` in :func:`lbs`:

* ``lbs_ref`` -- plain PyTorch, the specification (any float dtype, any device).
* ``_lbs_joints_kernel`` + ``_lbs_kernel`` -- Triton, two launches for the whole batch. The joint
  kernel computes the per-frame quantities in float32 from the joint basis
  ``[J_reg . v_template | J_reg . dirs]`` (:func:`construct_joint_basis`, (J, 3, 1+K) float32) and
  the (J,) int32 parents: one program per block of ``BLOCK_N`` frames (<= 4: the step is latency-
  bound, so many short programs), every quantity a (BLOCK_N,) vector. Rest joints ``basis . [1; c]``
  as exact fp32 products summed by ``tl.sum`` over (BLOCK_N, 3J, BLOCK_K) tiles (no ``tl.dot``, so
  no TF32 and no size-16 rule), Rodrigues with the formula of :func:`rodrigues` in float32 (same
  Taylor branch for ``|r|^2 < 1e-4``), and the chain in joint order (J constexpr, parents read at
  run time): each global transform ``G_j`` is kept in column j of twelve (BLOCK_N, J) register tiles
  and the parent's read back with a masked sum (exact: it adds zeros), so there are no barriers or
  scratch memory. It writes the pose feature (N, P), ``A`` (N, J, 3, 4) and the posed joints
  (N, J, 3) (+ translation; rounded to the model's dtype in the kernel, straight into the output) -- what the torch step of :func:`lbs_ref` (``rodrigues``,
  :func:`batch_rigid_transform`) gives, to float32 rounding. ``_lbs_kernel`` then runs one program
  per (block of ``BLOCK_V`` vertices, block of ``BLOCK_N`` frames): blendshapes as ``tl.dot`` over K
  in chunks of ``BLOCK_K``, pose correctives the same way over P, skinning
  ``sum_j w_vj (A_j [v; 1])`` and the translation, with every vertex written by exactly one program
  (no atomics). Inputs fp32/fp16/bf16 are loaded in their dtype and accumulated in fp32
  (``input_precision="ieee"``: no TF32).
* ``_vertex_normals_kernel`` -- Triton, one program per (block of vertices, frame): gathers each
  vertex's faces from the table of :func:`construct_vertex_faces` (V, M) int32 (``-1`` padded,
  M = largest valence), sums their unnormalised normals and normalises (``clamp_min(1e-12)``,
  vertices in no face get 0). Needs the posed vertices of every neighbour, hence a second launch.

Cost (elements of the input dtype, ``s`` bytes each; float32 = 4 bytes for the small per-frame
tensors). LBS kernel: reads dirs + posedirs + template + weights once per frame block,
``s V (3K + 3P + 3 + J)``, the per-frame tensors ``N (s K + 4 P + 48 J + 3 s)`` (re-read by
every vertex block from L2, counted once), writes ``s 3NV``; FLOPs ``6NV(K + P) + 24NVJ + 3NV``. The joint
kernel reads the basis ``12 J (1 + K)`` (L2 after the first frame block) and ``N s (K + 3J)``, writes
``N (4 P + 60 J)`` and does ``N J (6K + ~130)`` FLOPs. Building the joint basis adds ``2 J V 3K`` FLOPs
and a read of ``dirs`` unless ``joint_basis`` is passed precomputed (:func:`lbs` caches it per model).
Normals kernel: reads ``4 V M`` table bytes + ``F 12`` face bytes + ``~9 s V M N`` gathered
vertex bytes (L1/L2 hits mostly), writes ``s 3NV``; ~30 FLOPs per (vertex, face slot, frame).
:func:`lbs_cost` returns these numbers for benchmarks. The reference does the same FLOPs but
materialises ``v_shaped``, ``v_posed`` and the per-vertex (N, V, 4, 4) transforms in memory.

Dispatch (``impl``): ``"ref"`` -> reference; ``"triton"`` -> the kernels (CUDA tensors, or CPU
tensors under the Triton interpreter ``TRITON_INTERPRET=1``, otherwise a RuntimeError);
``"auto"`` -> Triton for CUDA tensors of a supported dtype when Triton is installed, else the
reference. There is no C++ LBS.

CUDA graphs (``graph=`` of :func:`lbs`, ``MVP_CUDA_GRAPHS``): on CUDA the Triton path is host-bound
(a handful of launches and allocations -- before the fused joint kernel also ~40 small torch ops for
the joint chain -- ~1 ms of host time against a few microseconds of GPU work), so :func:`lbs` replays
the whole call as one CUDA graph per (shapes, dtypes, model tensors, options) through
:class:`mvportrait.kernels._graphs.GraphCache`: per call one batched copy of coeffs / pose / translation
into the graph's inputs, one replay and one clone of the packed outputs. The joint basis, the faces
table, the int32 parents tensor and the value checks of ``parents`` / ``faces`` are computed once per
content (:func:`mvportrait.kernels._graphs.once`). Measured on an H200
(benchmarks/results/kernels_nvidia-h200.json) with the torch joint step, before the fused joint kernel:
0.19 ms per 1-frame call against 0.80 ms eager and 0.81 ms for the same launches without the graph;
inside the graph the ~40 small joint-step kernels were most of the GPU time.

Prepared calls (:func:`lbs_plan` -> :class:`LBSPlan`): a frame loop with one model at one batch size
leaves even the per-call work of :func:`lbs` (checks of nine tensors, cache keys, lookups) on the host.
``plan = lbs_plan(v_template, dirs, posedirs, j_regressor, parents, weights, batch=N, faces=None,
translation=True)`` does all validation and one-time work at creation (parents and faces value checks,
joint basis, int32 parents, faces tables, and on CUDA the graph capture, with the plan's own static input
buffers, through :func:`mvportrait.kernels._graphs.capture`). ``plan(coeffs, pose, translation, copy=True)``
then compares the three inputs' shape / dtype / device with the stored ones (ValueError / TypeError
naming the expected shape), copies them into the graph's inputs in one ``_foreach_copy_``, replays
and clones the packed outputs once -- or, ``copy=False``, returns views of the static outputs, valid
until the next call of the plan. Where no graph can run (CPU, ``impl="ref"``, ``MVP_CUDA_GRAPHS=0``,
inputs that require grad, a capture in progress, a failed capture) a call is ``lbs(..., graph=False)``:
the same results, fresh tensors. Model tensors follow :func:`lbs`'s semantics: the graph reads
``v_template``, ``dirs``, ``posedirs``, ``weights`` through their addresses (in-place updates are
seen); an in-place update of a tensor the one-time work derives from (``v_template``, ``dirs``,
``j_regressor``, ``parents``, ``faces``; their version counters are compared per call, inference
tensors excepted) makes the next call redo that work and capture again. A plan holds the tensors it
was made with: assigning a new tensor to a model attribute needs a new plan.
"""
from __future__ import annotations

import threading
import warnings

import torch

from mvportrait.kernels import _graphs
from mvportrait.kernels._triton import launcher, triton_available, triton_kernel

# Triton is optional and imported on the first Triton call, not here: importing mvportrait never
# imports triton, so TRITON_INTERPRET (which triton reads when *it* is imported) can still be set
# after importing mvportrait. The kernels below are plain functions until ``_triton.launcher`` wraps them.
triton = None
tl = None

__all__ = ["rodrigues", "lbs_ref", "lbs", "batch_rigid_transform", "construct_joint_basis",
           "construct_vertex_faces", "vertex_normals_ref", "vertex_normals", "lbs_cost",
           "lbs_plan", "LBSPlan", "triton_available"]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IMPLS = ("auto", "triton", "ref")


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


def batch_rigid_transform(rot: torch.Tensor, joints: torch.Tensor, parents):
    """Kinematic chain. rot (N, J, 3, 3), joints (N, J, 3) rest positions, parents (J,) tensor or list.

    Returns (posed_joints (N, J, 3), A (N, J, 4, 4)) where A maps rest-pose points to posed
    points for each joint (rest joint position already removed).
    """
    n, nj = joints.shape[:2]
    par = [int(p) for p in (parents if isinstance(parents, (list, tuple)) else parents.tolist())]
    rel = joints.clone()
    if nj > 1:  # parents gathered by integer views: no index tensor (a host copy) per call
        rel[:, 1:] = joints[:, 1:] - torch.stack([joints[:, p] for p in par[1:]], 1)
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


# ----------------------------------------------------------------------------- Triton kernels
@triton_kernel
def _lbs_kernel(coef_ptr, feat_ptr, tmpl_ptr, dirs_ptr, pdirs_ptr, w_ptr, a_ptr, trans_ptr, out_ptr,
                N, V, K, P, J,
                HAS_TRANS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    # coef (N, K) input dtype; feat (N, P) f32; tmpl (V, 3); dirs (V, 3, K); pdirs (V, 3, P);
    # w (V, J); a (N, J, 3, 4) f32; trans (N, 3); out (N, V, 3). All contiguous.
    offs_v = (tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_v = offs_v < V
    mask_n = offs_n < N
    # v_shaped[v, :, n] = template[v] + dirs[v] . coeffs[n]; tiles are (BLOCK_V, BLOCK_N)
    zero = tl.zeros((BLOCK_V, BLOCK_N), dtype=tl.float32)
    x = zero + tl.load(tmpl_ptr + offs_v * 3 + 0, mask=mask_v, other=0.0).to(tl.float32)[:, None]
    y = zero + tl.load(tmpl_ptr + offs_v * 3 + 1, mask=mask_v, other=0.0).to(tl.float32)[:, None]
    z = zero + tl.load(tmpl_ptr + offs_v * 3 + 2, mask=mask_v, other=0.0).to(tl.float32)[:, None]
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        c = tl.load(coef_ptr + offs_n[None, :] * K + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # (BK, BN)
        rows = dirs_ptr + offs_v[:, None] * (3 * K) + offs_k[None, :]
        m = mask_v[:, None] & mask_k[None, :]
        x += tl.dot(tl.load(rows, mask=m, other=0.0).to(tl.float32), c, input_precision="ieee")
        y += tl.dot(tl.load(rows + K, mask=m, other=0.0).to(tl.float32), c, input_precision="ieee")
        z += tl.dot(tl.load(rows + 2 * K, mask=m, other=0.0).to(tl.float32), c, input_precision="ieee")
    # pose correctives: v_posed = v_shaped + posedirs[v] . feature[n]
    for p0 in range(0, P, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        mask_p = offs_p < P
        f = tl.load(feat_ptr + offs_n[None, :] * P + offs_p[:, None],
                    mask=mask_p[:, None] & mask_n[None, :], other=0.0)  # (BK, BN) f32
        rows = pdirs_ptr + offs_v[:, None] * (3 * P) + offs_p[None, :]
        m = mask_v[:, None] & mask_p[None, :]
        x += tl.dot(tl.load(rows, mask=m, other=0.0).to(tl.float32), f, input_precision="ieee")
        y += tl.dot(tl.load(rows + P, mask=m, other=0.0).to(tl.float32), f, input_precision="ieee")
        z += tl.dot(tl.load(rows + 2 * P, mask=m, other=0.0).to(tl.float32), f, input_precision="ieee")
    # skinning: out = sum_j w[v, j] (A[n, j] [v_posed; 1])
    ox = zero
    oy = zero
    oz = zero
    for j in range(0, J):
        w = tl.load(w_ptr + offs_v * J + j, mask=mask_v, other=0.0).to(tl.float32)[:, None]
        a = a_ptr + offs_n * (12 * J) + 12 * j
        a00 = tl.load(a + 0, mask=mask_n, other=0.0)[None, :]
        a01 = tl.load(a + 1, mask=mask_n, other=0.0)[None, :]
        a02 = tl.load(a + 2, mask=mask_n, other=0.0)[None, :]
        a03 = tl.load(a + 3, mask=mask_n, other=0.0)[None, :]
        a10 = tl.load(a + 4, mask=mask_n, other=0.0)[None, :]
        a11 = tl.load(a + 5, mask=mask_n, other=0.0)[None, :]
        a12 = tl.load(a + 6, mask=mask_n, other=0.0)[None, :]
        a13 = tl.load(a + 7, mask=mask_n, other=0.0)[None, :]
        a20 = tl.load(a + 8, mask=mask_n, other=0.0)[None, :]
        a21 = tl.load(a + 9, mask=mask_n, other=0.0)[None, :]
        a22 = tl.load(a + 10, mask=mask_n, other=0.0)[None, :]
        a23 = tl.load(a + 11, mask=mask_n, other=0.0)[None, :]
        ox += w * (a00 * x + a01 * y + a02 * z + a03)
        oy += w * (a10 * x + a11 * y + a12 * z + a13)
        oz += w * (a20 * x + a21 * y + a22 * z + a23)
    if HAS_TRANS:
        ox += tl.load(trans_ptr + offs_n * 3 + 0, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        oy += tl.load(trans_ptr + offs_n * 3 + 1, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        oz += tl.load(trans_ptr + offs_n * 3 + 2, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    dst = out_ptr + offs_n[None, :] * (3 * V) + offs_v[:, None] * 3
    m = mask_v[:, None] & mask_n[None, :]
    tl.store(dst + 0, ox.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(dst + 1, oy.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(dst + 2, oz.to(out_ptr.dtype.element_ty), mask=m)


@triton_kernel
def _lbs_joints_kernel(coef_ptr, pose_ptr, basis_ptr, par_ptr, trans_ptr, feat_ptr, a_ptr, pj_ptr, N, K,
                       J: tl.constexpr, HAS_TRANS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr):
    # coef (N, K) input dtype; pose (N, 3J) input dtype; basis (3J, 1 + K) f32, row 3j + c = joint j,
    # coordinate c: [rest | directions]; par (J,) int32; trans (N, 3); outputs: feat (N, 9(J-1)) f32,
    # a (N, J, 3, 4) f32, pj (N, J, 3) any float dtype. All contiguous. Every per-frame quantity is a
    # (BLOCK_N,) float32 vector.
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < 3 * J
    # rest joints of every frame: jt[n, r] = basis[r, 0] + sum_k basis[r, 1 + k] c[n, k]; exact fp32
    # products summed with tl.sum over (BLOCK_N, BLOCK_R, BLOCK_K) tiles (no tl.dot: no TF32, no size rule)
    jt = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        c = tl.load(coef_ptr + offs_n[:, None] * K + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # (BN, BK)
        d = tl.load(basis_ptr + offs_r[:, None] * (K + 1) + 1 + offs_k[None, :],
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # (BR, BK)
        jt += tl.sum(c[:, None, :] * d[None, :, :], axis=2)
    jt += tl.load(basis_ptr + offs_r * (K + 1), mask=mask_r, other=0.0)[None, :]
    # global transforms G_j = [g_R | g_t] of the joints done so far, kept in registers: column j of
    # twelve (BLOCK_N, BLOCK_J) tiles; the parent (a runtime index) is read back by a masked sum
    cols = tl.arange(0, BLOCK_J)[None, :]
    tile = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    g00 = tile
    g01 = tile
    g02 = tile
    g03 = tile
    g10 = tile
    g11 = tile
    g12 = tile
    g13 = tile
    g20 = tile
    g21 = tile
    g22 = tile
    g23 = tile
    for j in tl.static_range(J):
        # rest joint j (column 3j + i of jt; the masked sums add exact zeros)
        cx = tl.sum(tl.where(offs_r[None, :] == 3 * j + 0, jt, 0.0), axis=1)
        cy = tl.sum(tl.where(offs_r[None, :] == 3 * j + 1, jt, 0.0), axis=1)
        cz = tl.sum(tl.where(offs_r[None, :] == 3 * j + 2, jt, 0.0), axis=1)
        # Rodrigues, as `rodrigues` in float32: R = I + a K + b K^2, Taylor series for t^2 < 1e-4
        rp = pose_ptr + offs_n * (3 * J) + 3 * j
        x = tl.load(rp + 0, mask=mask_n, other=0.0).to(tl.float32)
        y = tl.load(rp + 1, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(rp + 2, mask=mask_n, other=0.0).to(tl.float32)
        t2 = x * x + y * y + z * z
        small = t2 < 1e-4
        st = tl.sqrt(tl.where(small, 1.0, t2))  # no sqrt(0), no division by 0 in the unused branch
        sa = tl.where(small, 1 - t2 / 6 + t2 * t2 / 120, tl.sin(st) / st)
        sb = tl.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, (1 - tl.cos(st)) / (st * st))
        r00 = 1 + sb * (-(y * y) - z * z)  # K^2: diagonal -(|r|^2 - r_i^2), off-diagonal r_i r_j
        r01 = -sa * z + sb * (x * y)
        r02 = sa * y + sb * (x * z)
        r10 = sa * z + sb * (x * y)
        r11 = 1 + sb * (-(x * x) - z * z)
        r12 = -sa * x + sb * (y * z)
        r20 = -sa * y + sb * (x * z)
        r21 = sa * x + sb * (y * z)
        r22 = 1 + sb * (-(x * x) - y * y)
        if j == 0:  # root: G_0 = [R_0 | c_0]
            n00 = r00
            n01 = r01
            n02 = r02
            n03 = cx
            n10 = r10
            n11 = r11
            n12 = r12
            n13 = cy
            n20 = r20
            n21 = r21
            n22 = r22
            n23 = cz
        else:
            # pose feature R_j - I
            fp = feat_ptr + offs_n * (9 * (J - 1)) + 9 * (j - 1)
            tl.store(fp + 0, r00 - 1, mask=mask_n)
            tl.store(fp + 1, r01, mask=mask_n)
            tl.store(fp + 2, r02, mask=mask_n)
            tl.store(fp + 3, r10, mask=mask_n)
            tl.store(fp + 4, r11 - 1, mask=mask_n)
            tl.store(fp + 5, r12, mask=mask_n)
            tl.store(fp + 6, r20, mask=mask_n)
            tl.store(fp + 7, r21, mask=mask_n)
            tl.store(fp + 8, r22 - 1, mask=mask_n)
            p = tl.load(par_ptr + j)  # parent index, < j
            pm = cols == p
            p00 = tl.sum(tl.where(pm, g00, 0.0), axis=1)
            p01 = tl.sum(tl.where(pm, g01, 0.0), axis=1)
            p02 = tl.sum(tl.where(pm, g02, 0.0), axis=1)
            p03 = tl.sum(tl.where(pm, g03, 0.0), axis=1)
            p10 = tl.sum(tl.where(pm, g10, 0.0), axis=1)
            p11 = tl.sum(tl.where(pm, g11, 0.0), axis=1)
            p12 = tl.sum(tl.where(pm, g12, 0.0), axis=1)
            p13 = tl.sum(tl.where(pm, g13, 0.0), axis=1)
            p20 = tl.sum(tl.where(pm, g20, 0.0), axis=1)
            p21 = tl.sum(tl.where(pm, g21, 0.0), axis=1)
            p22 = tl.sum(tl.where(pm, g22, 0.0), axis=1)
            p23 = tl.sum(tl.where(pm, g23, 0.0), axis=1)
            # relative rest offset c_j - c_parent
            qm = offs_r[None, :] == 3 * p
            ux = cx - tl.sum(tl.where(qm, jt, 0.0), axis=1)
            uy = cy - tl.sum(tl.where(offs_r[None, :] == 3 * p + 1, jt, 0.0), axis=1)
            uz = cz - tl.sum(tl.where(offs_r[None, :] == 3 * p + 2, jt, 0.0), axis=1)
            # G_j = G_parent [R_j | c_j - c_parent]
            n00 = p00 * r00 + p01 * r10 + p02 * r20
            n01 = p00 * r01 + p01 * r11 + p02 * r21
            n02 = p00 * r02 + p01 * r12 + p02 * r22
            n03 = p00 * ux + p01 * uy + p02 * uz + p03
            n10 = p10 * r00 + p11 * r10 + p12 * r20
            n11 = p10 * r01 + p11 * r11 + p12 * r21
            n12 = p10 * r02 + p11 * r12 + p12 * r22
            n13 = p10 * ux + p11 * uy + p12 * uz + p13
            n20 = p20 * r00 + p21 * r10 + p22 * r20
            n21 = p20 * r01 + p21 * r11 + p22 * r21
            n22 = p20 * r02 + p21 * r12 + p22 * r22
            n23 = p20 * ux + p21 * uy + p22 * uz + p23
        # A_j = [G_R | G_t - G_R c_j]
        ap = a_ptr + offs_n * (12 * J) + 12 * j
        tl.store(ap + 0, n00, mask=mask_n)
        tl.store(ap + 1, n01, mask=mask_n)
        tl.store(ap + 2, n02, mask=mask_n)
        tl.store(ap + 3, n03 - (n00 * cx + n01 * cy + n02 * cz), mask=mask_n)
        tl.store(ap + 4, n10, mask=mask_n)
        tl.store(ap + 5, n11, mask=mask_n)
        tl.store(ap + 6, n12, mask=mask_n)
        tl.store(ap + 7, n13 - (n10 * cx + n11 * cy + n12 * cz), mask=mask_n)
        tl.store(ap + 8, n20, mask=mask_n)
        tl.store(ap + 9, n21, mask=mask_n)
        tl.store(ap + 10, n22, mask=mask_n)
        tl.store(ap + 11, n23 - (n20 * cx + n21 * cy + n22 * cz), mask=mask_n)
        # posed joint G_t (+ translation)
        tx = n03
        ty = n13
        tz = n23
        if HAS_TRANS:
            tx += tl.load(trans_ptr + offs_n * 3 + 0, mask=mask_n, other=0.0).to(tl.float32)
            ty += tl.load(trans_ptr + offs_n * 3 + 1, mask=mask_n, other=0.0).to(tl.float32)
            tz += tl.load(trans_ptr + offs_n * 3 + 2, mask=mask_n, other=0.0).to(tl.float32)
        jp = pj_ptr + offs_n * (3 * J) + 3 * j
        tl.store(jp + 0, tx.to(pj_ptr.dtype.element_ty), mask=mask_n)
        tl.store(jp + 1, ty.to(pj_ptr.dtype.element_ty), mask=mask_n)
        tl.store(jp + 2, tz.to(pj_ptr.dtype.element_ty), mask=mask_n)
        # remember G_j in column j for the joints below it
        jm = cols == j
        g00 = tl.where(jm, n00[:, None], g00)
        g01 = tl.where(jm, n01[:, None], g01)
        g02 = tl.where(jm, n02[:, None], g02)
        g03 = tl.where(jm, n03[:, None], g03)
        g10 = tl.where(jm, n10[:, None], g10)
        g11 = tl.where(jm, n11[:, None], g11)
        g12 = tl.where(jm, n12[:, None], g12)
        g13 = tl.where(jm, n13[:, None], g13)
        g20 = tl.where(jm, n20[:, None], g20)
        g21 = tl.where(jm, n21[:, None], g21)
        g22 = tl.where(jm, n22[:, None], g22)
        g23 = tl.where(jm, n23[:, None], g23)


@triton_kernel
def _vertex_normals_kernel(verts_ptr, faces_ptr, vf_ptr, out_ptr, V, M,
                           BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr):
    # verts (N, V, 3); faces (F, 3) int32; vf (V, M) int32, -1 padded; out (N, V, 3).
    offs_v = (tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    mask_v = offs_v < V
    fid = tl.load(vf_ptr + offs_v[:, None] * M + offs_m[None, :],
                  mask=mask_v[:, None] & (offs_m[None, :] < M), other=-1)  # (BV, BM)
    ok = fid >= 0
    fid = tl.where(ok, fid, 0).to(tl.int64)
    i0 = tl.load(faces_ptr + fid * 3 + 0, mask=ok, other=0).to(tl.int64) * 3
    i1 = tl.load(faces_ptr + fid * 3 + 1, mask=ok, other=0).to(tl.int64) * 3
    i2 = tl.load(faces_ptr + fid * 3 + 2, mask=ok, other=0).to(tl.int64) * 3
    base = verts_ptr + n * (3 * V)
    p0x = tl.load(base + i0 + 0, mask=ok, other=0.0).to(tl.float32)
    p0y = tl.load(base + i0 + 1, mask=ok, other=0.0).to(tl.float32)
    p0z = tl.load(base + i0 + 2, mask=ok, other=0.0).to(tl.float32)
    e1x = tl.load(base + i1 + 0, mask=ok, other=0.0).to(tl.float32) - p0x
    e1y = tl.load(base + i1 + 1, mask=ok, other=0.0).to(tl.float32) - p0y
    e1z = tl.load(base + i1 + 2, mask=ok, other=0.0).to(tl.float32) - p0z
    e2x = tl.load(base + i2 + 0, mask=ok, other=0.0).to(tl.float32) - p0x
    e2y = tl.load(base + i2 + 1, mask=ok, other=0.0).to(tl.float32) - p0y
    e2z = tl.load(base + i2 + 2, mask=ok, other=0.0).to(tl.float32) - p0z
    nx = tl.sum(e1y * e2z - e1z * e2y, axis=1)  # padding slots loaded zeros: cross = 0
    ny = tl.sum(e1z * e2x - e1x * e2z, axis=1)
    nz = tl.sum(e1x * e2y - e1y * e2x, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(nx * nx + ny * ny + nz * nz), 1e-12)
    dst = out_ptr + n * (3 * V) + offs_v * 3
    tl.store(dst + 0, (nx * inv).to(out_ptr.dtype.element_ty), mask=mask_v)
    tl.store(dst + 1, (ny * inv).to(out_ptr.dtype.element_ty), mask=mask_v)
    tl.store(dst + 2, (nz * inv).to(out_ptr.dtype.element_ty), mask=mask_v)


# ------------------------------------------------------------------------------ dispatch


def _use_triton(impl: str, device: torch.device, dtype: torch.dtype, op: str) -> bool:
    if impl not in _IMPLS:
        raise ValueError(f"{op}: impl must be one of {', '.join(_IMPLS)}, got {impl!r}")
    if impl == "ref":
        return False
    if impl == "auto":
        return device.type == "cuda" and dtype in _TRITON_DTYPES and triton_available()
    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"{op}: the Triton kernel takes float32/float16/bfloat16, got {dtype}; use impl='ref'")
    return True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


# --------------------------------------------------------------------- constant-data helpers
def construct_joint_basis(j_regressor: torch.Tensor, v_template: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """``[J_reg . v_template | J_reg . dirs]`` (J, 3, 1 + K) float32: joints are ``basis . [1; c]``.

    Constant per model and component count: compute it once and pass it to :func:`lbs` as
    ``joint_basis`` to skip a read of ``dirs`` per call.
    """
    _check("v_template", v_template, (None, 3))
    nv = v_template.shape[0]
    _check("j_regressor", j_regressor, (None, nv), v_template.dtype, v_template.device)
    _check("dirs", dirs, (nv, 3, None), v_template.dtype, v_template.device)
    jr = j_regressor.float()
    rest = jr @ v_template.float()  # (J, 3)
    d = (jr @ dirs.reshape(nv, -1).float()).reshape(jr.shape[0], 3, dirs.shape[2])  # (J, 3, K)
    return torch.cat([rest[..., None], d], -1).contiguous()


def construct_vertex_faces(faces: torch.Tensor, nv: int) -> torch.Tensor:
    """Vertex -> faces table (nv, M) int32: row v lists the faces that use v, ``-1`` padded.

    M is the largest valence (at least 1). A face that names a vertex twice appears twice in
    its row, as its normal is added once per corner. Topology is constant: build it once.
    """
    faces = _check_faces(faces, nv)
    nf = faces.shape[0]
    flat = faces.reshape(-1).long()
    fid = torch.arange(nf, device=faces.device).repeat_interleave(3)
    order = torch.argsort(flat, stable=True)
    vs, fs = flat[order], fid[order]
    counts = torch.bincount(flat, minlength=nv)
    m = max(1, int(counts.max())) if nf else 1
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(3 * nf, device=faces.device) - start[vs]
    table = torch.full((nv, m), -1, dtype=torch.int32, device=faces.device)
    table[vs, slot] = fs.to(torch.int32)
    return table


def _check_faces(faces, nv: int) -> torch.Tensor:
    if not isinstance(faces, torch.Tensor):
        raise TypeError(f"faces must be a torch.Tensor, got {type(faces).__name__}")
    if faces.dim() != 2 or faces.shape[1] != 3 or faces.is_floating_point() or faces.is_complex():
        raise ValueError(f"faces must be an integer tensor of shape (F, 3), got {faces.dtype} {tuple(faces.shape)}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= nv):
        raise ValueError(f"faces index vertices outside [0, {nv})")
    return faces


# ---------------------------------------------------------------------------- normals
def vertex_normals_ref(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (..., V, 3) of verts (..., V, 3) and faces (F, 3)."""
    faces = faces.long()
    v0, v1, v2 = verts[..., faces[:, 0], :], verts[..., faces[:, 1], :], verts[..., faces[:, 2], :]
    fn = torch.linalg.cross(v1 - v0, v2 - v0)  # (..., F, 3)
    out = torch.zeros_like(verts)
    for i in range(3):
        out.index_add_(-2, faces[:, i], fn)
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def vertex_normals(verts, faces, vertex_faces=None, *, out=None, impl="auto"):
    """Area-weighted unit vertex normals of posed meshes: verts (N, V, 3) -> (N, V, 3).

    ``faces`` (F, 3) integer; ``vertex_faces`` the (V, M) int32 table of
    :func:`construct_vertex_faces` (built once per ``faces`` content and cached when None);
    ``out`` an optional (N, V, 3) contiguous buffer of the dtype of ``verts``. See the module
    docstring for cost and ``impl``. The index-range check of ``faces`` runs once per content.
    """
    _check("verts", verts, (None, None, 3))
    n, nv = verts.shape[:2]
    faces = _checked_faces(faces, nv)
    if faces.device != verts.device:
        raise ValueError(f"faces are on {faces.device}, verts on {verts.device}")
    if out is not None:
        _check("out", out, (n, nv, 3), verts.dtype, verts.device)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    if not _use_triton(impl, verts.device, verts.dtype, "vertex_normals"):
        res = vertex_normals_ref(verts, faces)
        return res if out is None else out.copy_(res)
    if vertex_faces is None:
        vertex_faces = _graphs.once("lbs.vertex_faces", (faces,), lambda: construct_vertex_faces(faces, nv), nv)
    _check("vertex_faces", vertex_faces, (nv, None), torch.int32, verts.device)
    return _vertex_normals_triton(verts, _graphs.once("lbs.faces32", (faces,), lambda: faces.to(torch.int32)
                                                      .contiguous()), vertex_faces, out)


def _checked_faces(faces, nv: int) -> torch.Tensor:
    if not isinstance(faces, torch.Tensor):
        raise TypeError(f"faces must be a torch.Tensor, got {type(faces).__name__}")
    return _graphs.once("lbs.faces", (faces,), lambda: _check_faces(faces, nv), nv)


def _vertex_normals_triton(verts, faces32, vertex_faces, out=None):
    """The normals kernel on checked inputs (faces int32 contiguous); no host sync (graph-safe)."""
    kernel = launcher(_vertex_normals_kernel, verts.device, "vertex_normals")
    verts = verts.contiguous()
    vf = vertex_faces.contiguous()
    n, nv = verts.shape[:2]
    if out is None:
        out = torch.empty_like(verts)
    if n == 0 or nv == 0:
        return out
    m = vf.shape[1]
    block_m = _next_pow2(m)
    block_v = max(1, min(128, 2048 // block_m))
    grid = (_cdiv(nv, block_v), n)
    kernel[grid](verts, faces32, vf, out, nv, m, BLOCK_V=block_v, BLOCK_M=block_m)
    return out


# ---------------------------------------------------------------------------- public LBS
def lbs_cost(n: int, nv: int, k: int, nj: int = 5, dtype: torch.dtype = torch.float32,
             joint_basis: bool = False) -> dict:
    """Bytes moved and FLOPs of one Triton LBS call (joint and LBS kernels; module docstring), for benchmarks."""
    s = torch.empty((), dtype=dtype).element_size()
    p = 9 * (nj - 1)
    nbytes = s * nv * (3 * k + 3 * p + 3 + nj) + n * (s * k + 4 * p + 48 * nj + 3 * s) + s * 3 * n * nv
    flops = 6 * n * nv * (k + p) + 24 * n * nv * nj + 3 * n * nv
    nbytes += 12 * nj * (1 + k) + n * (s * (k + 3 * nj) + 4 * p + 60 * nj)  # the joint kernel
    flops += n * nj * (6 * k + 130)
    if not joint_basis:
        nbytes += s * 3 * nv * k
        flops += 2 * nj * nv * 3 * k
    return {"bytes": nbytes, "flops": flops}


def _lbs_joints_triton(coeffs, pose, joint_basis, parents_t, translation, joints_out=None):
    """The per-frame joint step in one launch, float32: rest joints ``basis . [1; c]``, Rodrigues, the pose
    feature and the kinematic chain. ``coeffs`` (N, K), ``pose`` (N, 3J), ``translation`` (N, 3) or None in
    fp32/fp16/bf16; ``joint_basis`` (J, 3, 1 + K) float32; ``parents_t`` (J,) int32 on the same device
    (``parents[0] == -1``, ``parents[j] < j``; not checked here). Returns ``feat`` (N, 9(J-1)), ``a``
    (N, J, 3, 4) and ``posed_joints`` (N, J, 3) (+ translation), float32 and contiguous: what the torch
    step of :func:`lbs_ref` computes (``rodrigues``, ``batch_rigid_transform``). ``joints_out``: an optional
    contiguous (N, J, 3) tensor of any float dtype that receives the posed joints instead (rounded from
    float32 in the kernel) and is returned as ``posed_joints``. Allocates only its outputs and never syncs
    with the host, so it can be graph-captured."""
    kernel = launcher(_lbs_joints_kernel, coeffs.device, "lbs")
    n, k = coeffs.shape
    nj = joint_basis.shape[0]
    dev = coeffs.device
    feat = torch.empty(n, 9 * (nj - 1), dtype=torch.float32, device=dev)
    a = torch.empty(n, nj, 3, 4, dtype=torch.float32, device=dev)
    posed_joints = torch.empty(n, nj, 3, dtype=torch.float32, device=dev) if joints_out is None else joints_out
    if n == 0 or nj == 0:
        return feat, a, posed_joints
    block_n = max(2, min(4, _next_pow2(n)))  # latency-bound: many small programs rather than few long ones
    block_r = max(2, _next_pow2(3 * nj))
    block_k = max(2, min(_next_pow2(k), 8192 // (block_n * block_r)))  # (BN, BR, BK) product tile <= 8192
    trans = translation.contiguous() if translation is not None else a  # dummy pointers when absent
    kernel[(_cdiv(n, block_n),)](coeffs.contiguous(), pose.contiguous(), joint_basis.contiguous(), parents_t, trans,
                                 feat if nj > 1 else a, a, posed_joints, n, k,
                                 J=nj, HAS_TRANS=translation is not None, BLOCK_N=block_n, BLOCK_R=block_r,
                                 BLOCK_K=block_k, BLOCK_J=max(2, _next_pow2(nj)), num_warps=4)
    return feat, a, posed_joints


def _lbs_triton(coeffs, pose, v_template, dirs, posedirs, parents_t, weights, translation, joint_basis, out,
                joints_out=None):
    """The Triton LBS on checked inputs (``parents_t`` the (J,) int32 parents on the device; ``out`` /
    ``joints_out`` optional contiguous (N, V, 3) / (N, J, 3) outputs of the model's dtype); no host sync,
    so it can be graph-captured."""
    kernel = launcher(_lbs_kernel, v_template.device, "lbs")
    n, k = coeffs.shape
    nv, nj = weights.shape
    p = posedirs.shape[2]
    # per-frame joint step, one launch, float32: pose feature (N, P), chain A (N, J, 3, 4), posed joints
    # (written in the model's dtype, into ``joints_out`` when given: no separate cast or copy)
    if joints_out is None:
        joints_out = torch.empty(n, nj, 3, dtype=v_template.dtype, device=v_template.device)
    feat, a, posed_joints = _lbs_joints_triton(coeffs, pose, joint_basis, parents_t, translation, joints_out)
    if out is None:
        out = torch.empty(n, nv, 3, dtype=v_template.dtype, device=v_template.device)
    if n and nv:
        block_v, block_n, warps = _vertex_config(n)
        block_k = 32
        grid = (_cdiv(nv, block_v), _cdiv(n, block_n))
        trans = translation.contiguous() if translation is not None else feat  # dummy pointer when absent
        kernel[grid](coeffs.contiguous(), feat, v_template.contiguous(), dirs.contiguous(), posedirs.contiguous(),
                     weights.contiguous(), a, trans, out, n, nv, k, p, nj,
                     HAS_TRANS=translation is not None, BLOCK_V=block_v, BLOCK_N=block_n, BLOCK_K=block_k,
                     num_warps=warps)
    return out, posed_joints


# (BLOCK_V, BLOCK_N, num_warps) of the vertex kernel; None: the built-in choice of _vertex_config. A
# benchmark sweep (benchmarks/bench_kernels.py --lbs-sweep) sets a tuple here; graph captures and plans
# made while it is set keep the launch they captured.
VERTEX_CONFIG = None


def _vertex_config(n: int) -> tuple[int, int, int]:
    """The vertex kernel's launch for ``n`` frames (tl.dot needs every block dimension >= 16): the best of
    the sweep on an H200 (prepared call, 5,023 vertices, fp32; session 9, gpu_suite_h200.txt): 16 x 16
    blocks at 4 warps up to 16 frames (1 frame 0.079 ms; 32 x 16: 0.101), 32 x 32 beyond (64 frames
    0.148 ms; 32 x 64 at 8 warps: 0.166; 16 x 16: 0.198): more, smaller programs than one wave of big ones."""
    if VERTEX_CONFIG is not None:
        return VERTEX_CONFIG
    return (16, 16, 4) if n <= 16 else (32, 32, 4)


def _packed_lbs(n, v_template, dirs, posedirs, parents_t, weights, joint_basis, normals=None):
    """The Triton path as ``fn(coeffs, pose, translation) -> (buf,)`` writing vertices, joints and,
    with ``normals = (faces32, vertex_faces)``, normals into one flat buffer (so one clone copies every
    output), and ``unpack(buf)`` -> [(N, V, 3), (N, J, 3)[, (N, V, 3)]] views of such a buffer.
    ``fn`` never syncs with the host: it can be captured as a CUDA graph."""
    nv, nj = weights.shape
    sizes = [n * nv * 3, n * nj * 3] + ([] if normals is None else [n * nv * 3])
    shapes = [(n, nv, 3), (n, nj, 3), (n, nv, 3)][:len(sizes)]
    specs = [(shape, (shape[1] * 3, 3, 1), sum(sizes[:i])) for i, shape in enumerate(shapes)]

    def unpack(buf):  # as_strided: the cheapest views on the host (an LBSPlan call makes them per frame)
        base = buf.storage_offset()
        return [buf.as_strided(shape, stride, base + off) for shape, stride, off in specs]

    def fn(coeffs, pose, translation):
        buf = torch.empty(sum(sizes), dtype=v_template.dtype, device=v_template.device)
        parts = unpack(buf)
        _lbs_triton(coeffs, pose, v_template, dirs, posedirs, parents_t, weights, translation, joint_basis, parts[0],
                    parts[1])
        if normals is not None:
            _vertex_normals_triton(parts[0], normals[0], normals[1], parts[2])
        return (buf,)

    return fn, unpack


def _check_model(v_template, dirs, posedirs, j_regressor, parents, weights, k=None):
    """Shape / dtype / device checks of the model tensors (``k`` components, any if None) -> (V, J, K)."""
    _check("v_template", v_template, (None, 3))
    nv = v_template.shape[0]
    dt, dev = v_template.dtype, v_template.device
    _check("j_regressor", j_regressor, (None, nv), dt, dev)
    nj = j_regressor.shape[0]
    _check("dirs", dirs, (nv, 3, k), dt, dev)
    _check("posedirs", posedirs, (nv, 3, 9 * (nj - 1)), dt, dev)
    _check("weights", weights, (nv, nj), dt, dev)
    _check("parents", parents, (nj,))
    return nv, nj, dirs.shape[2]


def _parents_list(parents) -> list[int]:
    par = parents.tolist()
    if par[0] != -1 or any(not (0 <= p < j) for j, p in enumerate(par) if j > 0):
        raise ValueError(f"parents must be topologically sorted with parents[0] == -1, got {par}")
    return par


def _parents_tensor(parents: torch.Tensor, device) -> torch.Tensor:
    """``parents`` (checked by :func:`_parents_list`) as the contiguous (J,) int32 tensor on ``device`` that the
    joint kernel reads; a device-side cast when ``parents`` is already there (no host round trip)."""
    return parents.to(device=device, dtype=torch.int32).contiguous()


GRAPHS = _graphs.GraphCache("lbs")  # CUDA graphs of the Triton path, one per shape / model / options


def lbs(coeffs, pose, v_template, dirs, posedirs, j_regressor, parents, weights, translation=None, *,
        faces=None, vertex_faces=None, joint_basis=None, out=None, impl="auto", graph=None):
    """Validating entry point; see the module docstring for the math, shapes and dispatch.

    Returns ``(vertices (N, V, 3), joints (N, J, 3))``, or ``(vertices, joints, normals)`` when
    ``faces`` (F, 3) is given (``vertex_faces`` from :func:`construct_vertex_faces`; built once
    per ``faces`` and cached when None). ``joint_basis`` from :func:`construct_joint_basis`
    (computed once per model and cached when None; the reference ignores it). ``out``: optional
    contiguous (N, V, 3) buffer for the vertices.

    ``graph``: on the Triton path with CUDA tensors, the whole call (joint chain, LBS kernel,
    normals kernel) is replayed as one CUDA graph per (shapes, dtypes, model tensors, options)
    -- ``None`` (default): when :func:`mvportrait.kernels._graphs.usable` allows it
    (``MVP_CUDA_GRAPHS`` not 0, no autograd inputs, not inside another capture); ``False``:
    never; ``True``: required (ValueError if not possible). Results are fresh tensors either way.
    The value checks of ``parents`` and ``faces`` read them to the host once per content, not per call.
    """
    _check("v_template", v_template, (None, 3))
    dt, dev = v_template.dtype, v_template.device
    _check("coeffs", coeffs, (None, dirs.shape[-1] if isinstance(dirs, torch.Tensor) and dirs.dim() == 3 else None),
           dt, dev)
    n = coeffs.shape[0]
    nv, nj, _ = _check_model(v_template, dirs, posedirs, j_regressor, parents, weights, coeffs.shape[1])
    _check("pose", pose, (n, 3 * nj), dt, dev)
    if translation is not None:
        _check("translation", translation, (n, 3), dt, dev)
    if out is not None:
        _check("out", out, (n, nv, 3), dt, dev)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    if joint_basis is not None:
        _check("joint_basis", joint_basis, (nj, 3, coeffs.shape[1] + 1), torch.float32, dev)
    if graph not in (None, True, False):
        raise ValueError(f"graph must be None, True or False, got {graph!r}")
    par = _graphs.once("lbs.parents", (parents,), lambda: _parents_list(parents))
    if faces is not None:
        faces = _checked_faces(faces, nv)
        if faces.device != dev:
            raise ValueError(f"faces are on {faces.device}, verts on {dev}")
    use_triton = _use_triton(impl, dev, dt, "lbs")
    tensors = (coeffs, pose, translation, v_template, dirs, posedirs, weights)
    use_graph = graph is not False and use_triton and n > 0 and nv > 0 and _graphs.usable(dev, tensors)
    if graph and not use_graph:
        raise ValueError("graph=True needs the Triton path on CUDA (impl 'auto'/'triton'), MVP_CUDA_GRAPHS=1, "
                         "a non-empty batch, no inputs that require grad and no CUDA graph capture in progress")
    if not use_triton:
        verts, joints = lbs_ref(coeffs, pose, v_template, dirs, posedirs, j_regressor, parents, weights, translation)
        if out is not None:
            verts = out.copy_(verts)
        if faces is None:
            return verts, joints
        return verts, joints, vertex_normals(verts, faces, vertex_faces, impl=impl)
    if joint_basis is None:
        joint_basis = _graphs.once("lbs.joint_basis", (j_regressor, v_template, dirs),
                                   lambda: construct_joint_basis(j_regressor, v_template, dirs))
    if faces is not None:
        if vertex_faces is None:
            vertex_faces = _graphs.once("lbs.vertex_faces", (faces,), lambda: construct_vertex_faces(faces, nv), nv)
        _check("vertex_faces", vertex_faces, (nv, None), torch.int32, dev)
        faces32 = _graphs.once("lbs.faces32", (faces,), lambda: faces.to(torch.int32).contiguous())
    par_t = _graphs.once("lbs.parents32", (parents,), lambda: _parents_tensor(parents, dev), dev)

    if use_graph:
        packed, unpack = _packed_lbs(n, v_template, dirs, posedirs, par_t, weights, joint_basis,
                                     None if faces is None else (faces32, vertex_faces))

        def finish(res):
            if out is None:
                return unpack(res[0].clone())
            verts, *rest = unpack(res[0])
            return [out.copy_(verts)] + [x.clone() for x in rest]

        keep = (v_template, dirs, posedirs, weights, joint_basis, par_t) + (() if faces is None else
                                                                          (faces32, vertex_faces))
        res = GRAPHS.run(("lbs", tuple(par)), packed, (coeffs, pose, translation), keep=keep, finish=finish)
        verts, joints, normals = res[0], res[1], (res[2] if faces is not None else None)
    else:
        verts, joints = _lbs_triton(coeffs, pose, v_template, dirs, posedirs, par_t, weights, translation,
                                    joint_basis, out)
        normals = None if faces is None else _vertex_normals_triton(verts, faces32, vertex_faces)
    return (verts, joints) if faces is None else (verts, joints, normals)


# --------------------------------------------------------------------------- prepared LBS
def _same(t, shape, dtype, device) -> bool:
    return isinstance(t, torch.Tensor) and t.shape == shape and t.dtype == dtype and t.device == device


class LBSPlan:
    """:func:`lbs` of one model at one batch size, prepared once (make it with :func:`lbs_plan`).

    ``plan(coeffs, pose, translation=None, *, copy=True)`` -> ``(vertices, joints)`` or
    ``(vertices, joints, normals)``, equal to :func:`lbs` on the same tensors. The inputs must have
    exactly the shapes of :attr:`input_shapes` ((N, K), (N, 3J), (N, 3)), the model's dtype and
    device (any strides); ``translation`` is required by a plan made with ``translation=True`` and
    refused by one made with ``translation=False``. ``copy=False`` returns the graph's static output
    buffers themselves: valid until the next call of this plan, which overwrites them (read them on
    the calling stream or copy them first; one caller at a time); on the paths without a graph results
    are fresh either way. Calls are serialised by a lock, so ``copy=True`` is safe from several threads.
    """

    def __init__(self, v_template, dirs, posedirs, j_regressor, parents, weights, *, batch, faces=None,
                 translation=True, impl="auto", graph=None):
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
            raise ValueError(f"batch must be an int >= 0, got {batch!r}")
        if not isinstance(translation, bool):
            raise ValueError(f"translation must be True or False, got {translation!r}")
        if graph not in (None, True, False):
            raise ValueError(f"graph must be None, True or False, got {graph!r}")
        nv, nj, k = _check_model(v_template, dirs, posedirs, j_regressor, parents, weights)
        dt, dev = v_template.dtype, v_template.device
        _parents_list(parents)  # value check (one host read, here rather than per call)
        if faces is not None:
            faces = _checked_faces(faces, nv)
            if faces.device != dev:
                raise ValueError(f"faces are on {faces.device}, the model on {dev}")
        self.model = (v_template, dirs, posedirs, j_regressor, parents, weights)
        self.faces, self.batch, self.translation, self.impl, self.graph = faces, batch, translation, impl, graph
        self.dtype, self.device = dt, dev
        self.input_shapes = (torch.Size((batch, k)), torch.Size((batch, 3 * nj)), torch.Size((batch, 3)))
        self.captures = self.replays = 0  # graph captures / replays of this plan (tests and benchmarks)
        self._graphable = _use_triton(impl, dev, dt, "lbs_plan") and graph is not False and batch > 0 and nv > 0
        self._grad_check = (v_template, dirs, posedirs, weights)  # what lbs's graph decision looks at too
        # the one-time work derives from these (joint basis, parents list, faces tables): an in-place
        # update of one bumps its version counter and the next call redoes that work (inference
        # tensors have no counter: updates of them are not seen, as in _graphs.once)
        self._sources = tuple(t for t in (v_template, dirs, j_regressor, parents, faces)
                              if t is not None and not t.is_inference())
        self._lock = threading.Lock()
        self._static = None  # (StaticGraph, views of its packed output)
        self._unpack = None
        self._failed = False
        self._seen = None
        if self._graphable and _graphs.usable(dev, self._grad_check):
            with self._lock:
                self._prepare()
        elif graph:
            raise ValueError(_GRAPH_NEEDS)

    def _versions(self):
        return tuple(t._version for t in self._sources)

    def _prepare(self):
        """The graph path's one-time work: joint basis, parents list, faces tables and the capture."""
        v_template, dirs, posedirs, j_regressor, parents, weights = self.model
        self._static, self._failed, self._seen = None, False, self._versions()
        _parents_list(parents)  # value check again: parents may have changed in place
        par_t = _parents_tensor(parents, self.device)
        basis = construct_joint_basis(j_regressor, v_template, dirs)
        normals = None
        if self.faces is not None:
            normals = (self.faces.to(torch.int32).contiguous(), construct_vertex_faces(self.faces, v_template.shape[0]))
        fn, self._unpack = _packed_lbs(self.batch, v_template, dirs, posedirs, par_t, weights, basis, normals)
        inputs = [torch.zeros(s, dtype=self.dtype, device=self.device) for s in self.input_shapes]
        if not self.translation:
            inputs[2] = None
        try:
            g = _graphs.capture(fn, inputs, keep=self.model + (basis, par_t) + (normals or ()))
        except RuntimeError as e:  # e.g. an op that cannot be captured: run without the graph from now on
            warnings.warn(f"lbs_plan: CUDA graph capture failed ({e}); running without graphs", RuntimeWarning,
                          stacklevel=3)
            self._failed = True
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return
        self.captures += 1
        self.replays += 1
        self._static = (g, tuple(self._unpack(g.outputs[0])))

    def _reject(self, name, t, shape):
        if name == "translation" and t is None:
            raise ValueError(f"lbs_plan: this plan was made with translation=True: pass translation of shape "
                             f"{tuple(shape)}")
        try:
            _check(name, t, tuple(shape), self.dtype, self.device)
        except (TypeError, ValueError) as e:
            raise type(e)(f"lbs_plan (batch={self.batch}): {e}") from None

    def __call__(self, coeffs, pose, translation=None, *, copy=True):
        dt, dev = self.dtype, self.device
        cs, ps, ts = self.input_shapes
        if not _same(coeffs, cs, dt, dev):
            self._reject("coeffs", coeffs, cs)
        if not _same(pose, ps, dt, dev):
            self._reject("pose", pose, ps)
        if self.translation:
            if not _same(translation, ts, dt, dev):
                self._reject("translation", translation, ts)
        elif translation is not None:
            raise ValueError("lbs_plan: this plan was made with translation=False; pass translation=None or "
                             "make a plan with translation=True")
        inputs = (coeffs, pose, translation)
        if self._graphable and _graphs.usable(dev, inputs + self._grad_check):
            with self._lock:
                if (self._static is None and not self._failed) or self._versions() != self._seen:
                    self._prepare()
                if self._static is not None:
                    g, views = self._static
                    buf = g.replay(inputs)[0]
                    self.replays += 1
                    return tuple(self._unpack(buf.clone())) if copy else views
        elif self.graph:
            raise ValueError(_GRAPH_NEEDS)
        v_template, dirs, posedirs, j_regressor, parents, weights = self.model
        return lbs(coeffs, pose, v_template, dirs, posedirs, j_regressor, parents, weights, translation,
                   faces=self.faces, impl=self.impl, graph=False)

    def __repr__(self):
        path = "graph" if self._static is not None else "no graph"
        return (f"LBSPlan(batch={self.batch}, vertices={self.model[0].shape[0]}, components={self.input_shapes[0][1]}, "
                f"joints={self.model[3].shape[0]}, normals={self.faces is not None}, "
                f"translation={self.translation}, {self.dtype}, {self.device}, impl={self.impl!r}, path={path})")


_GRAPH_NEEDS = ("graph=True needs the Triton path on CUDA (impl 'auto'/'triton'), MVP_CUDA_GRAPHS=1, a non-empty "
                "batch, no inputs that require grad and no CUDA graph capture in progress")


def lbs_plan(v_template, dirs, posedirs, j_regressor, parents, weights, *, batch, faces=None, translation=True,
             impl="auto", graph=None) -> LBSPlan:
    """Prepare :func:`lbs` for one model and batch size; returns an :class:`LBSPlan` to call per frame.

    Model tensors as in :func:`lbs`; ``batch`` the N of every call; ``faces`` (F, 3) to also return
    normals; ``translation`` whether calls pass one; ``impl`` / ``graph`` as in :func:`lbs`. All
    validation and one-time work happen here (see the module docstring, "Prepared calls").
    """
    return LBSPlan(v_template, dirs, posedirs, j_regressor, parents, weights, batch=batch, faces=faces,
                   translation=translation, impl=impl, graph=graph)
