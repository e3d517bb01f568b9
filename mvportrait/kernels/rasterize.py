"""Triangle rasterization with a z-buffer: per-pixel triangle id, barycentrics and depth.

Inputs (one mesh topology, N images -- e.g. N = B*T*V views of a batch of heads):

* ``verts_pix`` (N, Nv, 3) float: per vertex ``[u, v, z]``; ``u, v`` in pixels with pixel
  ``(i, j)`` (row, column) centred at ``(u, v) = (j + 0.5, i + 0.5)``, ``v`` pointing down;
  ``z`` is camera-space depth (> 0 in front of the camera). ``u, v`` must come from a pinhole
  projection with positive focal lengths (``u = fx x/z + cx``, ``v = fy y/z + cy``) for the
  perspective correction and the back-face rule below to hold.
* ``faces`` (F, 3) int64 vertex indices, counter-clockwise seen from outside (outward normal
  ``(v1 - v0) x (v2 - v0)``).

Semantics (exact; the reference below is the specification fast paths must reproduce):

* Edge functions for pixel centre ``p``: ``w_i(p) = (p_k - p_j) x (p - p_j)`` with
  ``(i, j, k)`` cyclic and ``a x b = a_u b_v - a_v b_u``; signed doubled area
  ``2A = (u1 - u0)(v2 - v0) - (v1 - v0)(u2 - u0) = w_0 + w_1 + w_2``. Screen barycentrics
  ``s_i = w_i / (w_0 + w_1 + w_2)``.
  They are evaluated in float64, each edge with its endpoints in a canonical order (lower
  vertex index first, the sign flipped as needed), so two triangles sharing an edge compute
  bit-identical (negated) edge values and the mesh is watertight.
* Coverage: a pixel is covered when its centre lies strictly inside the triangle, or exactly
  on an edge that is a *top* or *left* edge (the D3D/OpenGL top-left rule, for the y-down
  image): orient the triangle so ``2A > 0``; an edge running from ``a`` to ``b`` owns its
  pixels when ``b_v < a_v``, or ``b_v == a_v`` and ``b_u > a_u``. Pixels on an edge shared by
  two triangles therefore belong to exactly one of them.
* Dropped triangles: any vertex with ``z <= near`` (no clipping -- the whole triangle goes),
  zero area (``2A == 0``), and with ``cull_backfaces`` back faces. A face is front-facing when
  its outward normal points toward the camera; for a projection with ``fx, fy > 0`` and the
  y-down image this is ``2A < 0`` (``2A = (v0 . n) fx fy / (z0 z1 z2)`` in camera space), so
  culling drops ``2A > 0``.
* Perspective-correct barycentrics ``b_i = (s_i / z_i) / sum_j (s_j / z_j)``; depth
  ``z = 1 / sum_j (s_j / z_j)`` (the exact camera z of the surface point seen at that pixel).
* Visibility: smallest depth wins; exact depth ties go to the lowest face index.

Outputs (:class:`Fragments`): ``tri_id`` (N, H, W) int64 face index or -1; ``bary`` (N, H, W, 3)
perspective-correct, in face-vertex order, zero where empty; ``depth`` (N, H, W) camera z, 0
where empty; ``mask`` (N, H, W) bool. Float outputs have the dtype of ``verts_pix``.

Cost (reference): C candidate pixels = sum over kept triangles of their clipped bounding-box
areas (about 2x the covered area for small triangles). Per candidate ~15 FLOPs (three edge
functions: 2 sub + 2 mul + 1 sub each, in float64) and, on the gathered path for small
triangles, ~130 bytes moved (12 float64 coefficients + indices); large triangles broadcast
their coefficients instead (~30 bytes per candidate). Per covered candidate ~20 FLOPs more
(barycentrics, depth) and two scatter-min passes. Setup ~60 FLOPs per triangle. Buffers: a
float64 z-buffer and an int64 id buffer (16 bytes per pixel) plus the outputs, N*H*W*(8 + 3*4 +
4 + 1) bytes for float32; per block ~200 bytes x ``max_candidates``. ``interpolate``: 6*C_attr
FLOPs and ~(3*C_attr*4 + 40) bytes moved per covered pixel.
Measured (CPU, 1 thread): 9,800 faces / 4,902 vertices, 4 views at 256^2: ~0.05 s; 4 views at
1024^2 fully covered by two triangles: ~1.3 s.

This module holds the reference (``rasterize_ref`` / ``interpolate_ref``) and the validating
entry points (``rasterize`` / ``interpolate`` / ``normal_map``, and ``rasterize_normal_map`` =
``rasterize`` then ``normal_map`` in one call), which dispatch on ``impl``:

* ``"ref"``: the PyTorch reference (any device).
* ``"cpp"``: the C++ CPU kernels in :mod:`mvportrait.kernels.cpu` (pybind11 extension built by
  ``pip install -e .``; a pool of std::threads over (view, block of rows); covered pixels go
  through a fragment queue whose barycentrics are computed a vector at a time, with an AVX2 path
  for small triangles and an SSE2 row loop for the others, chosen at run time; the GIL released).
  Same triangle ids, coverage, barycentrics and depth as the reference, bit for bit on x86-64
  (the same float64 operations in the same order); CPU tensors only. Measured (idle 2-core AMD
  EPYC VM; ``benchmarks/bench_rasterize_cpu.py``): 4 views at 256^2 of the 9,976-face head in
  ~1.8 ms on two threads vs 36-39 ms for the reference (20-21x), ~7.6 ms vs 220-235 ms at 512^2
  on one thread (29-31x). ``interpolate`` and :func:`normal_map`
  (interpolate + renormalise + RGB encoding in one pass) have C++ paths too.
* ``"triton"``: the tile-binned Triton kernels in :mod:`mvportrait.kernels.rasterize_triton`
  (triangle setup, binning to 8x8-pixel tiles by sort, one launch over (image, tile) for every
  view, a fused interpolation / normal-map pass). Same float64 operations as the reference with
  no fused multiply-adds, so triangle ids, coverage and depth match it exactly (ties included);
  one host sync per call (the pair count, read with the input checks). On CUDA the public calls
  replay CUDA graphs; ``rasterize_normal_map`` replays the rasterizer and the normal map as one
  graph with one host read. CUDA tensors, or CPU tensors under the Triton interpreter
  (``TRITON_INTERPRET=1``; tests only). Measured on an H200: 4 views x 512^2 of the head in
  ~0.45 ms vs ~4 ms for the reference on the same GPU (graphed: 0.29 ms).
* ``"auto"`` (default): Triton for CUDA tensors when triton is installed (else the reference);
  C++ for CPU tensors when the extension is built, else the reference.

The renderer passes ``impl=mvportrait.envs.kernels()`` (``MVP_KERNELS``); this module reads no
environment variables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Fragments", "rasterize_ref", "interpolate_ref", "normal_map_ref", "rasterize", "interpolate",
           "normal_map", "rasterize_normal_map", "IMPLS"]

_WORK = torch.float64
IMPLS = ("auto", "triton", "cpp", "ref")


@dataclass
class Fragments:
    tri_id: torch.Tensor  # (N, H, W) int64, -1 = empty
    bary: torch.Tensor  # (N, H, W, 3) perspective-correct barycentrics, 0 where empty
    depth: torch.Tensor  # (N, H, W) camera z, 0 where empty
    mask: torch.Tensor  # (N, H, W) bool

    @property
    def shape(self) -> torch.Size:
        return self.tri_id.shape


def _empty_fragments(n, height, width, dtype, device) -> Fragments:
    return Fragments(
        tri_id=torch.full((n, height, width), -1, dtype=torch.int64, device=device),
        bary=torch.zeros(n, height, width, 3, dtype=dtype, device=device),
        depth=torch.zeros(n, height, width, dtype=dtype, device=device),
        mask=torch.zeros(n, height, width, dtype=torch.bool, device=device),
    )


def _setup(verts_pix, faces, height, width, cull_backfaces, near):
    """Per kept triangle: edge coefficients, bounding boxes, 1/z. All float math in float64."""
    n, _, _ = verts_pix.shape
    nf = faces.shape[0]
    tri = verts_pix.to(_WORK)[:, faces]  # (N, F, 3, 3) [vertex, (u, v, z)]
    u, v, z = tri.unbind(-1)  # each (N, F, 3)
    area2 = (u[..., 1] - u[..., 0]) * (v[..., 2] - v[..., 0]) - (v[..., 1] - v[..., 0]) * (u[..., 2] - u[..., 0])
    keep = (z > near).all(-1) & (area2 != 0)  # (N, F)
    if cull_backfaces:
        keep &= area2 < 0
    # Pixel columns j whose centre j + 0.5 lies in [umin, umax]; clamp first so ints never overflow.
    lo_u = torch.ceil(u.amin(-1).clamp(-1.0, width + 1.0) - 0.5).long().clamp(min=0)
    hi_u = torch.floor(u.amax(-1).clamp(-1.0, width + 1.0) - 0.5).long().clamp(max=width - 1)
    lo_v = torch.ceil(v.amin(-1).clamp(-1.0, height + 1.0) - 0.5).long().clamp(min=0)
    hi_v = torch.floor(v.amax(-1).clamp(-1.0, height + 1.0) - 0.5).long().clamp(max=height - 1)
    keep &= (lo_u <= hi_u) & (lo_v <= hi_v)
    flat = keep.reshape(-1).nonzero()[:, 0]  # (M,) ascending => ordered by (image, face id)
    if flat.numel() == 0:
        return None
    sel = lambda x: x.reshape(n * nf, *x.shape[2:])[flat]  # noqa: E731
    u, v, z, area2 = sel(u), sel(v), sel(z), sel(area2)  # (M, 3), (M,)
    orient = torch.sign(area2)  # (M,) +1 / -1
    # Edge i is opposite vertex i and runs j -> k, (j, k) = (i+1, i+2) mod 3.
    j_idx = torch.tensor([1, 2, 0], device=u.device)
    k_idx = torch.tensor([2, 0, 1], device=u.device)
    fid = (flat % nf)
    fv = faces[fid]  # (M, 3) vertex ids
    swap = fv[:, j_idx] > fv[:, k_idx]  # (M, 3) canonical order: lower vertex id first
    uj, uk, vj, vk = u[:, j_idx], u[:, k_idx], v[:, j_idx], v[:, k_idx]
    ax, ay = torch.where(swap, uk, uj), torch.where(swap, vk, vj)
    bx, by = torch.where(swap, uj, uk), torch.where(swap, vj, vk)
    sign = torch.where(swap, -1.0, 1.0).to(_WORK) * orient[:, None]  # (M, 3) oriented: inside => > 0
    du, dv = orient[:, None] * (uk - uj), orient[:, None] * (vk - vj)  # edge direction when 2A > 0
    owner = (dv < 0) | ((dv == 0) & (du > 0))  # (M, 3) top-left rule
    return dict(
        # oriented edge i at p: sdx_i * (p_v - ay_i) - sdy_i * (p_u - ax_i); the sign is folded into
        # the direction (negation is exact), so every term is one correctly rounded float64 op.
        ax=ax.contiguous(), ay=ay.contiguous(), sdx=(sign * (bx - ax)).contiguous(),
        sdy=(sign * (by - ay)).contiguous(), owner=owner.contiguous(), inv_z=(1.0 / z).contiguous(),  # (M, 3)
        col0=lo_u.reshape(-1)[flat], row0=lo_v.reshape(-1)[flat],
        bw=(hi_u - lo_u + 1).reshape(-1)[flat], bh=(hi_v - lo_v + 1).reshape(-1)[flat],
        base=(flat // nf) * (height * width), face=fid,
    )


def _bary_depth(ew, inv_z):
    """Perspective-correct barycentrics (K, 3) and depth (K,) from oriented edge values (K, 3)."""
    scr = ew / ew.sum(-1, keepdim=True).clamp_min(torch.finfo(_WORK).tiny)  # screen-space
    q = scr * inv_z  # (K, 3)
    qs = q.sum(-1)
    return q / qs[:, None], 1.0 / qs


class _ZBuffer:
    """Float64 depth + winning kept-triangle index per pixel; winners' bary/depth go to ``frags``."""

    def __init__(self, npix, none_id, frags, device):
        self.depth = torch.full((npix,), math.inf, dtype=_WORK, device=device)
        self.ids = torch.full((npix,), none_id, dtype=torch.int64, device=device)
        self.none = none_id
        self.out_bary = frags.bary.view(-1, 3)
        self.out_depth = frags.depth.view(-1)

    def merge(self, pix, ti, ew, inv_z):
        """Candidates (K,) covering pixels ``pix`` with oriented edge values ``ew`` (K, 3).

        A (pixel, triangle) pair occurs at most once overall, so after the two scatter-mins the
        candidate whose id equals the pixel's winner is unique and writes bary/depth.
        """
        bary, depth = _bary_depth(ew, inv_z)
        old = self.depth[pix]
        self.depth.scatter_reduce_(0, pix, depth, "amin")
        new = self.depth[pix]
        self.ids[pix[new < old]] = self.none  # a nearer surface arrived: forget the old winner
        win = (depth == new).nonzero()[:, 0]
        pix, ti, bary, depth = pix[win], ti[win], bary[win], depth[win]
        self.ids.scatter_reduce_(0, pix, ti, "amin")
        final = (self.ids[pix] == ti).nonzero()[:, 0]
        self.out_bary[pix[final]] = bary[final].to(self.out_bary.dtype)
        self.out_depth[pix[final]] = depth[final].to(self.out_depth.dtype)


def _inside(ew, owner):
    return ((ew > 0) | ((ew == 0) & owner)).all(-1)


def _raster_small(s, sel, width, zb, max_candidates):
    """Triangles ``sel`` (bbox-sized work): enumerate every (triangle, pixel) candidate exactly.

    Candidate k of the concatenated bounding boxes maps back to its triangle with a
    searchsorted over the cumulative counts; per-triangle coefficients are gathered per candidate.
    """
    dev = zb.depth.device
    count = s["bw"][sel] * s["bh"][sel]
    ends = count.cumsum(0)
    starts = ends - count
    total = int(ends[-1]) if len(ends) else 0
    for c0 in range(0, total, max_candidates):
        k = torch.arange(c0, min(c0 + max_candidates, total), dtype=torch.int64, device=dev)  # (C,)
        loc = torch.searchsorted(ends, k, right=True)  # (C,) index into sel
        ti = sel[loc]
        bw = s["bw"][ti]
        off = k - starts[loc]
        row = off // bw
        col = off - row * bw
        row += s["row0"][ti]
        col += s["col0"][ti]
        py = (row.to(_WORK) + 0.5)[:, None]
        px = (col.to(_WORK) + 0.5)[:, None]
        ew = s["sdx"][ti] * (py - s["ay"][ti]) - s["sdy"][ti] * (px - s["ax"][ti])  # (C, 3)
        hit = _inside(ew, s["owner"][ti]).nonzero()[:, 0]
        if hit.numel():
            ti = ti[hit]
            zb.merge(s["base"][ti] + row[hit] * width + col[hit], ti, ew[hit], s["inv_z"][ti])


def _raster_large(s, sel, width, zb, max_candidates):
    """Triangles ``sel`` one at a time, bounding box rows in blocks: no per-pixel gathers.

    The edge values are the same float64 operations as in ``_raster_small`` (row / column
    terms broadcast instead of gathered), so results are bitwise identical.
    """
    dev = zb.depth.device
    for t in sel.tolist():
        r0, c0 = int(s["row0"][t]), int(s["col0"][t])
        bh, bw = int(s["bh"][t]), int(s["bw"][t])
        px = torch.arange(c0, c0 + bw, dtype=torch.int64, device=dev).to(_WORK) + 0.5  # (W',)
        tid = torch.tensor([t], device=dev)
        ax, ay, sdx, sdy = s["ax"][t], s["ay"][t], s["sdx"][t], s["sdy"][t]  # (3,)
        owner, inv_z = s["owner"][t], s["inv_z"][t]
        rows_per = max(1, max_candidates // bw)
        for rb in range(r0, r0 + bh, rows_per):
            rows = torch.arange(rb, min(rb + rows_per, r0 + bh), dtype=torch.int64, device=dev)  # (R,)
            py = rows.to(_WORK) + 0.5
            ew = (sdx * (py[:, None, None] - ay)) - (sdy * (px[None, :, None] - ax))  # (R, W', 3)
            hit = _inside(ew, owner).reshape(-1).nonzero()[:, 0]
            if hit.numel():
                r, c = hit // bw, hit % bw
                pix = s["base"][t] + rows[r] * width + (c0 + c)
                zb.merge(pix, tid.expand(len(hit)), ew.reshape(-1, 3)[hit], inv_z)


def rasterize_ref(verts_pix: torch.Tensor, faces: torch.Tensor, height: int, width: int, *,
                  cull_backfaces: bool = True, near: float = 1e-4, max_candidates: int = 1 << 19,
                  large_bbox: int = 4096) -> Fragments:
    """Plain-PyTorch rasterizer; semantics in the module docstring. No input checks.

    Every pixel centre in every kept triangle's clipped bounding box is a candidate. Triangles
    whose box has fewer than ``large_bbox`` pixels are processed together, ``max_candidates``
    candidates at a time (enumerated exactly, no padding); larger ones one by one in blocks of
    rows. Each block: edge tests, a scatter-min of depth into a float64 z-buffer, then a
    scatter-min of face index among the candidates equal to the new minimum (exact ties go to the
    lowest face index); the winner writes its barycentrics and depth. Memory stays bounded by
    ~200 bytes x ``max_candidates`` plus the z-buffer (16 bytes per pixel) and the outputs.
    """
    n = verts_pix.shape[0]
    dev, out_dtype = verts_pix.device, verts_pix.dtype
    frags = _empty_fragments(n, height, width, out_dtype, dev)
    s = _setup(verts_pix, faces, height, width, cull_backfaces, near) if n and faces.shape[0] else None
    if s is None:
        return frags
    m = s["face"].shape[0]
    zb = _ZBuffer(n * height * width, m, frags, dev)
    big = s["bw"] * s["bh"] >= large_bbox
    # small triangles first, then large: order does not matter for the result (min-reductions)
    _raster_small(s, (~big).nonzero()[:, 0], width, zb, max_candidates)
    _raster_large(s, big.nonzero()[:, 0], width, zb, max_candidates)
    covered = (zb.ids < m).nonzero()[:, 0]  # (P,) flat pixel ids
    frags.tri_id.view(-1)[covered] = s["face"][zb.ids[covered]]
    frags.mask.view(-1)[covered] = True
    return frags


def interpolate_ref(attrs: torch.Tensor, faces: torch.Tensor, frags: Fragments) -> torch.Tensor:
    """Per-pixel attributes ``sum_i bary_i * attrs[face[tri_id]][i]``: (N, H, W, C), 0 where empty.

    ``attrs`` (N, Nv, C) float, ``faces`` (F, 3) int64, ``frags`` from :func:`rasterize` with the
    same N. Output dtype = ``attrs.dtype``.
    """
    n, h, w = frags.tri_id.shape
    c = attrs.shape[-1]
    out = torch.zeros(n, h, w, c, dtype=attrs.dtype, device=attrs.device)
    idx = frags.mask.reshape(-1).nonzero()[:, 0]  # (P,)
    if idx.numel() == 0:
        return out
    img = idx // (h * w)
    fv = faces[frags.tri_id.reshape(-1)[idx]]  # (P, 3)
    a = attrs[img[:, None], fv]  # (P, 3, C)
    b = frags.bary.reshape(-1, 3)[idx].to(attrs.dtype)  # (P, 3)
    out.view(-1, c)[idx] = (b[:, :, None] * a).sum(1)
    return out


def normal_map_ref(normals: torch.Tensor, faces: torch.Tensor, frags: Fragments) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolated, renormalised normals and their RGB encoding: ``(unit, rgb)``, each (N, H, W, 3).

    ``unit = n / max(|n|, 1e-12)`` with ``n = interpolate_ref(normals, faces, frags)``;
    ``rgb = unit * 0.5 + 0.5`` where covered, 0 elsewhere (``unit`` is 0 there too). ``normals``
    (N, Nv, 3) float, per vertex, in the frame the map is wanted in (the renderer passes display
    camera frame normals). Cost per covered pixel: 18 + ~15 FLOPs, ~(36 + 24 + 40) bytes moved.
    """
    n = interpolate_ref(normals, faces, frags)
    unit = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rgb = (unit * 0.5 + 0.5) * frags.mask[..., None].to(unit.dtype)
    return unit, rgb


# ---------------------------------------------------------------------------- public entry points
def _check_size(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_faces(faces, nv, device, *, check_range: bool = True) -> torch.Tensor:
    if not isinstance(faces, torch.Tensor):
        raise TypeError(f"faces must be a torch.Tensor, got {type(faces).__name__}")
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {tuple(faces.shape)}")
    if faces.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"faces must be int64 (or int32), got {faces.dtype}")
    if faces.device != device:
        raise ValueError(f"faces are on {faces.device}, vertices on {device}")
    if check_range and faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= nv):
        raise ValueError(f"faces index vertices in [{int(faces.min())}, {int(faces.max())}], "
                         f"but there are {nv} vertices (valid: 0..{nv - 1})")
    return faces.long()


def _pick_impl(impl, device: torch.device, what: str) -> str:
    """``impl`` (auto | triton | cpp | ref | None = auto) -> the implementation that runs: triton | cpp | ref."""
    impl = "auto" if impl is None else impl
    if not isinstance(impl, str) or impl.strip().lower() not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)} (or None for auto), got {impl!r}")
    impl = impl.strip().lower()
    if impl == "ref":
        return "ref"
    from ._triton import triton_available  # noqa: PLC0415

    if impl == "triton":
        if not triton_available():
            raise RuntimeError(f"impl='triton' {what} needs the triton package (pip install triton); "
                               "use impl='cpp' (CPU) or impl='ref'")
        return "triton"  # CPU tensors: the launcher raises unless TRITON_INTERPRET=1
    if impl == "auto" and device.type == "cuda":
        return "triton" if triton_available() else "ref"
    from . import cpu  # noqa: PLC0415 -- lazy: logs once if the extension is missing

    if impl == "cpp":
        if device.type != "cpu":
            raise ValueError(f"impl='cpp' runs on CPU tensors, got tensors on {device}; use impl='ref' or 'auto'")
        if not cpu.available():
            raise RuntimeError(f"impl='cpp' requested but {cpu.build_hint()}")
        return "cpp"
    return "cpp" if device.type == "cpu" and cpu.available() else "ref"  # auto


def rasterize(verts_pix: torch.Tensor, faces: torch.Tensor, height: int, width: int, *,
              cull_backfaces: bool = True, near: float = 1e-4, impl: str | None = "auto",
              graph: bool | None = None) -> Fragments:
    """Validating entry point; see the module docstring for semantics, shapes, cost and ``impl``.

    ``impl``: ``"auto"`` (None), ``"triton"``, ``"cpp"`` or ``"ref"``. Every implementation returns
    the same :class:`Fragments`.

    ``graph`` (Triton path on CUDA): ``None`` (default) replays one CUDA graph per (shapes,
    options, faces) from the second call of a shape on -- no host work but one read of the pair
    count and the check flags -- where :func:`mvportrait.kernels._graphs.usable` allows it
    (``MVP_CUDA_GRAPHS`` not 0); ``False`` launches the kernels directly; ``True`` requires the
    graph (ValueError where it cannot be used). Same results either way, fresh tensors each call;
    details in :func:`mvportrait.kernels.rasterize_triton._graphed`.
    """
    which, checked = _rasterize_checks(verts_pix, faces, height, width, near, impl, graph)
    return _rasterize(which, checked, verts_pix, faces, height, width, cull_backfaces, near, graph)


def _rasterize(which, checked, verts_pix, faces, height, width, cull_backfaces, near, graph) -> Fragments:
    if which == "triton":
        from .rasterize_triton import rasterize_triton  # noqa: PLC0415

        # faces as given (int32 or int64): no conversion per call, and a constant address for the graph
        return rasterize_triton(verts_pix, faces, height, width, cull_backfaces=bool(cull_backfaces),
                                near=float(near), graph=graph)
    faces = checked
    if which == "cpp":
        from . import cpu  # noqa: PLC0415

        return cpu.rasterize(verts_pix, faces, height, width, cull_backfaces=bool(cull_backfaces), near=float(near))
    if not torch.isfinite(verts_pix).all():
        raise ValueError("verts_pix contains NaN or infinite values")
    return rasterize_ref(verts_pix, faces, height, width, cull_backfaces=bool(cull_backfaces), near=float(near))


def _rasterize_checks(verts_pix, faces, height, width, near, impl, graph):
    """:func:`rasterize`'s argument checks; returns (the implementation that runs, the checked faces)."""
    if not isinstance(verts_pix, torch.Tensor):
        raise TypeError(f"verts_pix must be a torch.Tensor, got {type(verts_pix).__name__}")
    if verts_pix.dim() != 3 or verts_pix.shape[-1] != 3:
        raise ValueError(f"verts_pix must have shape (N, Nv, 3) holding [u, v, z], got {tuple(verts_pix.shape)}")
    if not verts_pix.is_floating_point():
        raise ValueError(f"verts_pix must be a floating tensor, got {verts_pix.dtype}")
    height, width = _check_size("height", height), _check_size("width", width)
    if isinstance(near, bool) or not isinstance(near, (int, float)) or not (math.isfinite(near) and near > 0):
        raise ValueError(f"near must be a positive number, got {near!r}")
    if graph not in (None, True, False):
        raise ValueError(f"graph must be None, True or False, got {graph!r}")
    which = _pick_impl(impl, verts_pix.device, "rasterizer")
    if graph and which != "triton":
        raise ValueError(f"graph=True needs the Triton path (impl 'auto' or 'triton' with CUDA tensors), "
                         f"got impl {which!r}")
    # The C++ and Triton paths check finiteness and face indices themselves (same messages), in
    # their own passes over the data (Triton: read back in the call's one host sync).
    return which, _check_faces(faces, verts_pix.shape[1], verts_pix.device, check_range=which == "ref")


def _check_vertex_attrs(name: str, t, frags, channels: int | None = None) -> None:
    """Per-vertex attributes (N, Nv, C) matching the fragments' batch, dtype and device."""
    if not isinstance(frags, Fragments):
        raise TypeError(f"frags must be Fragments, got {type(frags).__name__}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    n, c = frags.tri_id.shape[0], channels or "C"
    if t.dim() != 3 or (channels is not None and t.shape[-1] != channels):
        raise ValueError(f"{name} must have shape (N, Nv, {c}), got {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} must have shape (N={n}, Nv, {c}) like the fragments, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if frags.tri_id.device != t.device:
        raise ValueError(f"{name} are on {t.device}, fragments on {frags.tri_id.device}")


def _check_ref_values(t, faces, frags, nan_message: str) -> None:
    """What the reference path checks before use (the C++ path checks the same itself)."""
    if not torch.isfinite(t).all():
        raise ValueError(nan_message)
    if frags.mask.any() and int(frags.tri_id.max()) >= faces.shape[0]:
        raise ValueError(f"fragments reference face {int(frags.tri_id.max())}, but faces has {faces.shape[0]} rows")


def interpolate(attrs: torch.Tensor, faces: torch.Tensor, frags: Fragments, *, impl: str | None = "auto") -> torch.Tensor:
    """Validating entry point for :func:`interpolate_ref`: attrs (N, Nv, C) -> (N, H, W, C).

    ``impl`` as for :func:`rasterize`; ``"cpp"`` runs a multithreaded per-pixel loop (same
    operations as the reference: barycentrics cast to the attrs dtype, ``(b0 a0 + b1 a1) + b2 a2``);
    ``"triton"`` one Triton pass over the pixels (float16/bfloat16 attributes accumulate in float32).
    """
    _check_vertex_attrs("attrs", attrs, frags)
    which = _pick_impl(impl, attrs.device, "interpolation")
    use_cpp = which == "cpp"
    # the C++ path checks finiteness, face indices and fragment face ids itself (same messages)
    checked = _check_faces(faces, attrs.shape[1], attrs.device, check_range=which == "ref")
    if which == "triton":  # faces as given (int32 or int64): the kernel reads both, no conversion per call
        from .rasterize_triton import interpolate_triton  # noqa: PLC0415

        return interpolate_triton(attrs, faces, frags)  # value checks in the kernel
    faces = checked
    if use_cpp:
        from . import cpu  # noqa: PLC0415

        return cpu.interpolate(attrs, faces, frags)
    _check_ref_values(attrs, faces, frags, "attrs contains NaN or infinite values")
    return interpolate_ref(attrs, faces, frags)


def normal_map(normals: torch.Tensor, faces: torch.Tensor, frags: Fragments, *,
               impl: str | None = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Validating entry point for :func:`normal_map_ref`: normals (N, Nv, 3) -> (unit, rgb).

    ``impl`` as for :func:`rasterize`; ``"cpp"`` fuses interpolation, renormalisation and the
    encoding into one pass over the pixels (|n| accumulated in float64); ``"triton"`` does the
    same in one Triton pass (in the normals' dtype, float32 for float16/bfloat16).
    """
    _check_vertex_attrs("normals", normals, frags, channels=3)
    which = _pick_impl(impl, normals.device, "normal map")
    use_cpp = which == "cpp"
    checked = _check_faces(faces, normals.shape[1], normals.device, check_range=which == "ref")
    if which == "triton":  # faces as given (int32 or int64): the kernel reads both, no conversion per call
        from .rasterize_triton import normal_map_triton  # noqa: PLC0415

        return normal_map_triton(normals, faces, frags)  # value checks in the kernel
    faces = checked
    if use_cpp:
        from . import cpu  # noqa: PLC0415

        return cpu.normal_map(normals, faces, frags)
    _check_ref_values(normals, faces, frags, "normals contain NaN or infinite values")
    return normal_map_ref(normals, faces, frags)


def rasterize_normal_map(verts_pix: torch.Tensor, normals: torch.Tensor, faces: torch.Tensor, height: int,
                         width: int, *, cull_backfaces: bool = True, near: float = 1e-4, impl: str | None = "auto",
                         graph: bool | None = None) -> tuple[Fragments, torch.Tensor, torch.Tensor]:
    """``(frags, unit, rgb)``: :func:`rasterize` and :func:`normal_map` of ``normals`` on its fragments.

    The same results, checks and error messages as ``frags = rasterize(verts_pix, faces, height,
    width, ...)`` followed by ``unit, rgb = normal_map(normals, faces, frags, impl=impl)``, for every
    ``impl`` (``"ref"`` / ``"cpp"`` run exactly those two calls). On the Triton path with CUDA graphs
    (``graph`` as for :func:`rasterize`) one graph replays the rasterizer and the normal-map pass,
    the check flags of both are reduced on the device and read back in the call's one host sync,
    and the outputs are cloned out of the graph with one allocation and one copy -- the per-frame
    host cost of ``rasterize`` alone (see :func:`mvportrait.kernels.rasterize_triton._graphed`).
    """
    which, checked = _rasterize_checks(verts_pix, faces, height, width, near, impl, graph)
    if (which == "triton" and isinstance(normals, torch.Tensor) and normals.dim() == 3
            and normals.shape[0] == verts_pix.shape[0] and normals.shape[2] == 3 and normals.is_floating_point()
            and normals.device == verts_pix.device):  # else the two calls (and their messages, in order)
        from .rasterize_triton import rasterize_normal_map_triton  # noqa: PLC0415

        return rasterize_normal_map_triton(verts_pix, normals, faces, height, width,
                                           cull_backfaces=bool(cull_backfaces), near=float(near), graph=graph)
    frags = _rasterize(which, checked, verts_pix, faces, height, width, cull_backfaces, near, graph)
    return (frags, *normal_map(normals, faces, frags, impl=impl))
