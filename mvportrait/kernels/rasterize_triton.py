"""Triton path of :mod:`mvportrait.kernels.rasterize`: a tile-binned rasterizer for all views.

Same semantics as ``rasterize_ref`` (module docstring of :mod:`mvportrait.kernels.rasterize`):
the same float64 operations in the same order for the triangle setup, the edge functions
(canonical endpoint order), the top-left rule, the perspective-correct barycentrics and the
depth, launched with ``enable_fp_fusion=False`` so no multiply-add is contracted (the PTX has
no ``fma.f64``; float64 ``/`` is ``div.rn.f64``). Triangle ids, coverage and float64 depth
therefore come out bit-identical to the reference, ties included: 0 mismatching pixels in every
test (interpreter, and compiled on an H200 at 4 x 512^2 of the head), so the issue's 0.1% budget
is unused. Float outputs are the float64 values cast to the output dtype.

Pipeline (one call of :func:`rasterize_triton`, N images of one mesh topology):

1. ``_raster_setup_kernel`` -- one program per (block of faces, image): gathers the three
   vertices, drops triangles (a vertex at ``z <= near``, ``2A == 0``, back faces, an empty
   clipped pixel box, non-finite or out-of-range input) and writes for every (image, face) a
   128-byte float64 record ``[ax(3), ay(3), sdx(3), sdy(3), 1/z(3), owner bits]`` plus its tile
   rectangle ``[tx0, ty0, tiles wide]`` and its tile count (0 when dropped). Nothing is compacted:
   triangle ``t = image * F + face`` keeps its slot, so no sync is needed here. Each program
   also runs the reference's value checks on its share of the input (every vertex finite, every
   face index in range) and writes a flag after the counts.
2. Binning, two modes (``binning=`` of the public functions, default :data:`BINNING` = ``"count"``;
   the same pairs, bit-identical fragments either way, tested against each other and the reference):

   * ``"sort"`` (torch + ``_raster_bin_kernel``): one ``cumsum`` over counts and flags gives every
     triangle's pair offset, the total number of (triangle, tile) pairs ``E`` and the count of
     failed checks. ``_raster_bin_kernel`` writes each triangle's pairs at its exclusive-prefix
     offset (int32 key = image * tiles + tile); a stable ``torch.sort`` by key groups them per
     (image, tile) in ascending triangle id (the raster kernel reads the ids through the sort's
     permutation), and ``searchsorted`` finds the list boundaries. No atomics.
   * ``"count"`` (``_raster_count_kernel`` twice + torch; no sort, no searchsorted, no
     permutation): pass 1 adds 1 per pair to its (image, tile) counter (int32 atomics into a
     zeroed ``N * tiles + 1`` buffer, tile k at k + 1); one ``cumsum`` of the counters ends every
     tile's list (int64, ``[0, end of tile 0, ...]``, the last entry is ``E``; the failed checks
     are the sum of the flags); pass 2 counts the counters back down and writes each triangle id
     to the slot its decrement gives (``end[k + 1] - c``, c in [1, count]), so the list holds
     every pair exactly once, grouped per tile, in an order the atomics decide -- the raster
     kernel's result does not depend on it (see step 3). Not yet timed on a GPU (the hope: the
     sort's ~41 us and the searchsorted become a memset, two bin-sized kernels, a 16k-entry
     cumsum and a flags sum at the head's 4 x 512^2, and the raster kernel skips the permutation
     read). Measured on an H200 (session 8): the public ``rasterize`` 0.244 ms with the counting bin vs
     0.289 ms with the sort, ``rasterize_normal_map`` 0.299 vs 0.349 ms: the default since.

   Two ways to size the pair buffers (both modes):

   * exact (:func:`rasterize_triton` off CUDA graphs, the reference behaviour): the one host
     sync of the call reads ``E`` and the flags (on a failure the reference's checks run and
     raise their message) and the buffers get exactly ``E`` entries -- nothing is ever dropped.
   * capacity (:func:`rasterize_triton_no_sync`, what the CUDA graph replays): no host sync,
     every shape independent of the data. The buffers hold a fixed ``capacity`` (sort: keys
     prefilled with ``INT32_MAX``, which the sort puts after every real key and ``searchsorted``
     never counts, the bin kernel masks writes past ``capacity``; count: the scatter masks slots
     past ``capacity`` and the raster kernel clamps the list bounds to it) and a (2,) int64 device
     tensor ``stat = [E, failed checks]`` is returned for the caller to read afterwards. ``E <=
     capacity`` and no failed check: bit-identical to the exact path; otherwise the result is
     invalid and the caller reruns the exact path (never a dropped triangle in a returned result).
3. ``_raster_tiles_kernel`` -- one launch, one program per (image, tile) of ``TILE_H x TILE_W``
   pixels (every view in the same grid): loops over the tile's list ``BLOCK_T`` triangles at a
   time ((pixels, BLOCK_T) blocks), evaluates the edge functions and the depth in float64 and
   keeps the nearest depth and its triangle in registers (exact ties -> the lowest triangle id,
   compared explicitly: the lexicographic minimum of (depth, id), so the result does not depend
   on the list order, and the counting bin's unordered lists give the same bits). At the end the
   winner's record is gathered once per pixel to compute its barycentrics, and tri_id, bary,
   depth and mask are written once (empty pixels too: -1 / 0 / 0 / False); pixels past the
   image edge (sizes that are not tile multiples) are masked.
4. ``_interpolate_kernel`` -- one program per block of pixels: attributes of the winning face
   interpolated with the barycentrics (``interpolate``), or, with ``NORMAL``, interpolated,
   renormalised and RGB-encoded normals (``normal_map``), in one pass; the same kernel checks
   the attribute values, face indices and fragment face ids (one flag per program). Called
   alone (:func:`interpolate_triton`, :func:`normal_map_triton`) the flags are reduced on the
   device and read back as one value in one sync, not graphed: the fragments it reads are new
   tensors every call, so a graph would have to copy ~25 MB into its inputs to save one launch.
   :func:`rasterize_normal_map_triton` (the public ``rasterize_normal_map``) runs it right after
   step 3 on the fragments just written, inside the same graph.

CUDA graphs (:func:`_graphed`; the default of :func:`rasterize_triton`,
:func:`rasterize_normal_map_triton` and the public ``rasterize`` / ``rasterize_normal_map`` for
CUDA tensors, ``graph=False`` turns it off, as does ``MVP_CUDA_GRAPHS=0``): the first call of a
(shapes, options, binning mode) key runs the exact path and sets the capacity to a multiple of
4096 >= 1.25 E (at least :data:`MIN_CAPACITY`); later calls replay one graph of steps 1-3 (with the normal map:
1-4, the normal-map flags summed on the device into ``stat = [E, failed raster checks, failed
normal-map checks]``) per (key, capacity, ``faces`` address, normal map or not) -- ``faces`` read
in place as a constant, the vertices (and normals) copied into the graph's input buffers -- then
queue one clone of the outputs (the four Fragments, and ``unit`` / ``rgb``, are views of one
buffer) and read ``stat``, the one host sync: per call the host does one copy per input, one
graph launch, one clone and that read. E > capacity: the exact path reruns the call and the
capacity grows (the next call captures a graph of the new size); failed checks: the exact path
(rasterize, then the normal map) reruns and raises. A capture that fails is reported once
(RuntimeWarning by ``GraphCache``) and those shapes then run the capacity pipeline without a graph.

Precision: all rasterization math in float64 (GPUs with a low float64 rate -- consumer cards
run it at 1/64 of float32 -- are correspondingly slower). Interpolation runs in the attribute
dtype (float32 for float16 / bfloat16 attributes).

Cost (N images, F faces, E pairs, P = N H W pixels, s = output float size):
setup reads ~(24 + 36) bytes and writes 148 bytes per (image, face), ~80 FLOPs; binning moves
~40 bytes per pair (key + id written, sorted, gathered) plus 8 bytes per tile (the counting bin: rereads
the 16-byte rectangle + count per triangle, two 4-byte atomics and a 4-byte id per pair, ~16 bytes per tile
for the counters and their cumsum); the raster kernel reads ~140 bytes per pair (record + list entry +
permutation, mostly L2; 8 fewer with the counting bin) and evaluates
``TILE_H * TILE_W`` pixel centres per pair at ~45 float64 FLOPs each (three edge functions,
the top-left test, four divisions counted as one each), then per pixel gathers 128 bytes for
the winner and writes ``8 + 3 s + s + 1`` bytes. Interpolation per pixel: reads 8 + 1 + 3 s + 24
bytes and gathers ``3 C`` attributes, ~6 C FLOPs; the normal map adds ~15 FLOPs and writes 6 s
bytes. The 9,976-face head seen by 4 views at 512^2: 18,392 of 39,904 triangles kept; E = 64k
pairs with 8x8 tiles (38k with 16x16, 27k with 32x32), i.e. 4.1M pixel evaluations (9.8M, 28M)
~ 0.2 GFLOP float64; ~25 MB of outputs (+25 MB for the float32 normal map). The graph path sorts
its capacity C (a multiple of 4096 in [1.25 E, 1.25 E + 4096), 81,920 for the head's 64k pairs)
instead of E keys, plus 12 bytes per padding key written (the counting bin: nothing per unused slot),
and copies the outputs once more (the clone: 2 x 25 MB moved for the head, ~12 us at 4 TB/s; 2 x 50 MB
with the normal map).

Measured on an H200 (``bench_kernels.py --raster-sweep`` in ``benchmarks/gpu_suite.sh``, the tree of
67f66e1; ``benchmarks/results/kernels_nvidia-h200.json`` and ``gpu_suite_h200.txt``), 4 x 512^2 of the
head, float32: public ``rasterize`` 0.645 ms p50 with 8x8 tiles / 2 triangles per step / 2 warps
(``rasterize_triton`` alone 0.52 ms; 0.40 ms with 4 warps, now the default), 0.88 ms with the normal
map, the reference 7.49 ms. GPU time per call: tiles 87 us, sort 41 us, interpolate 27 us, setup 14 us,
bin 3 us; the rest is host time (launches, allocations, two device-to-host reads of bin counts).
Graphed (H200, same scene, capacity then a power of two >= 1.5 E): public ``rasterize`` 0.290 ms,
``rasterize`` + ``normal_map`` 0.586 ms (the separate normal-map call: a launch, allocations and a
flag sync, ~0.3 ms of host time). ``rasterize_normal_map`` runs both in one graph with one host read
(target < 0.3 ms): 0.349 ms with the sort bin, 0.299 ms with the counting bin (H200, tree of 56d6aff;
``bench_kernels.py`` rows ``triton`` / ``triton-countbin`` of that run), which is therefore the default;
the sort stays as ``binning="sort"`` (rows ``triton-sortbin`` since).
"""
from __future__ import annotations

import math

import torch

from mvportrait.kernels import _graphs
from mvportrait.kernels._triton import launcher, triton_available, triton_kernel

# Imported on the first Triton call by ``_triton.launcher`` (which fills these in).
triton = None
tl = None

__all__ = ["rasterize_triton", "rasterize_triton_no_sync", "rasterize_normal_map_triton", "interpolate_triton",
           "normal_map_triton", "triton_available", "TILE", "REC", "GRAPHS", "MIN_CAPACITY", "BINNING", "BINNINGS"]

TILE = (8, 8)  # default tile (rows, columns) of the raster kernel on the GPU
REC = 16  # float64 words per triangle record
BINNINGS = ("sort", "count")  # step 2's modes (module docstring)
BINNING = "count"  # the default (binning=None): faster than "sort" on an H200 (module docstring)
_INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------ Triton kernels
@triton_kernel
def _raster_setup_kernel(verts_ptr, faces_ptr, near_ptr, rec_ptr, rect_ptr, cnt_ptr, N, F, NV, H, W, TX,
                         CULL: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK: tl.constexpr,
                         VBLOCK: tl.constexpr):
    # verts (N, NV, 3) any float dtype; faces (F, 3) int32 or int64; near (1,) f64; rec (N*F, 16) f64;
    # rect (N*F, 3) int32 [tx0, ty0, tiles wide]; cnt (N*F + N*G,) int32: per (image, face) the
    # tile count, then one input-check flag per program (G = grid width). All contiguous.
    img = tl.program_id(1)
    # the reference's value checks, one flag per program: a non-finite value among this program's
    # VBLOCK scalars of verts[img] (every vertex, used or not), or a face index out of range
    vo = tl.program_id(0) * VBLOCK + tl.arange(0, VBLOCK)
    vx = tl.load(verts_ptr + img.to(tl.int64) * NV * 3 + vo, mask=vo < NV * 3, other=0.0)
    bad = tl.max(((vx - vx) != 0.0).to(tl.int32), axis=0)  # x - x is NaN for inf and NaN
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    fm = f < F
    i0 = tl.load(faces_ptr + f * 3 + 0, mask=fm, other=0)
    i1 = tl.load(faces_ptr + f * 3 + 1, mask=fm, other=0)
    i2 = tl.load(faces_ptr + f * 3 + 2, mask=fm, other=0)
    ok = fm & (i0 >= 0) & (i0 < NV) & (i1 >= 0) & (i1 < NV) & (i2 >= 0) & (i2 < NV)  # bad ids: raised later
    i0 = i0.to(tl.int32)  # < NV where used
    i1 = i1.to(tl.int32)
    i2 = i2.to(tl.int32)
    bad = tl.maximum(bad, tl.max((fm & ~ok).to(tl.int32), axis=0))
    tl.store(cnt_ptr + N * F + img * tl.num_programs(0) + tl.program_id(0), bad)
    vb = verts_ptr + img.to(tl.int64) * NV * 3
    u0 = tl.load(vb + i0.to(tl.int64) * 3 + 0, mask=ok, other=0.0).to(tl.float64)
    v0 = tl.load(vb + i0.to(tl.int64) * 3 + 1, mask=ok, other=0.0).to(tl.float64)
    z0 = tl.load(vb + i0.to(tl.int64) * 3 + 2, mask=ok, other=0.0).to(tl.float64)
    u1 = tl.load(vb + i1.to(tl.int64) * 3 + 0, mask=ok, other=0.0).to(tl.float64)
    v1 = tl.load(vb + i1.to(tl.int64) * 3 + 1, mask=ok, other=0.0).to(tl.float64)
    z1 = tl.load(vb + i1.to(tl.int64) * 3 + 2, mask=ok, other=0.0).to(tl.float64)
    u2 = tl.load(vb + i2.to(tl.int64) * 3 + 0, mask=ok, other=0.0).to(tl.float64)
    v2 = tl.load(vb + i2.to(tl.int64) * 3 + 1, mask=ok, other=0.0).to(tl.float64)
    z2 = tl.load(vb + i2.to(tl.int64) * 3 + 2, mask=ok, other=0.0).to(tl.float64)
    near = tl.load(near_ptr)
    # finite check (x - x is NaN for inf and NaN): non-finite input raises after the sync
    fin = ((u0 - u0) + (v0 - v0) + (z0 - z0) + (u1 - u1) + (v1 - v1) + (z1 - z1) + (u2 - u2) + (v2 - v2)
           + (z2 - z2)) == 0.0
    area2 = (u1 - u0) * (v2 - v0) - (v1 - v0) * (u2 - u0)
    keep = ok & fin & (z0 > near) & (z1 > near) & (z2 > near) & (area2 != 0.0)
    if CULL:
        keep = keep & (area2 < 0.0)
    # pixel columns j whose centre j + 0.5 lies in [umin, umax], clamped first (as the reference)
    wl = W + 1.0  # an int argument may arrive as a constexpr (Triton specialises 1): no .to()
    hl = H + 1.0
    umin = tl.minimum(tl.minimum(tl.minimum(u0, u1), u2), wl)
    umax = tl.minimum(tl.maximum(tl.maximum(u0, u1), u2), wl)
    vmin = tl.minimum(tl.minimum(tl.minimum(v0, v1), v2), hl)
    vmax = tl.minimum(tl.maximum(tl.maximum(v0, v1), v2), hl)
    c0 = tl.maximum(tl.ceil(tl.maximum(umin, -1.0) - 0.5).to(tl.int32), 0)
    c1 = tl.minimum(tl.floor(tl.maximum(umax, -1.0) - 0.5).to(tl.int32), W - 1)
    r0 = tl.maximum(tl.ceil(tl.maximum(vmin, -1.0) - 0.5).to(tl.int32), 0)
    r1 = tl.minimum(tl.floor(tl.maximum(vmax, -1.0) - 0.5).to(tl.int32), H - 1)
    keep = keep & (c0 <= c1) & (r0 <= r1)
    tx0 = c0 // TILE_W
    ty0 = r0 // TILE_H
    tw = c1 // TILE_W - tx0 + 1
    th = r1 // TILE_H - ty0 + 1
    t = img.to(tl.int64) * F + f
    tl.store(cnt_ptr + t, tl.where(keep, tw * th, 0), mask=fm)
    tl.store(rect_ptr + t * 3 + 0, tl.where(keep, tx0, 0), mask=fm)
    tl.store(rect_ptr + t * 3 + 1, tl.where(keep, ty0, 0), mask=fm)
    tl.store(rect_ptr + t * 3 + 2, tl.where(keep, tw, 1), mask=fm)
    # edge i is opposite vertex i and runs j -> k, (j, k) = (i+1, i+2) mod 3; canonical order:
    # lower vertex id first, the sign folded into the direction (negation is exact)
    orient = tl.where(area2 > 0.0, 1.0, -1.0).to(tl.float64)
    r = rec_ptr + t * 16
    owner = tl.zeros((BLOCK,), tl.int32)
    for i in tl.static_range(3):
        if i == 0:
            uj, vj, ij, uk, vk, ik = u1, v1, i1, u2, v2, i2
        elif i == 1:
            uj, vj, ij, uk, vk, ik = u2, v2, i2, u0, v0, i0
        else:
            uj, vj, ij, uk, vk, ik = u0, v0, i0, u1, v1, i1
        swap = ij > ik
        ax = tl.where(swap, uk, uj)
        ay = tl.where(swap, vk, vj)
        bx = tl.where(swap, uj, uk)
        by = tl.where(swap, vj, vk)
        sign = tl.where(swap, -1.0, 1.0).to(tl.float64) * orient
        tl.store(r + i, ax, mask=fm)
        tl.store(r + 3 + i, ay, mask=fm)
        tl.store(r + 6 + i, sign * (bx - ax), mask=fm)
        tl.store(r + 9 + i, sign * (by - ay), mask=fm)
        du = orient * (uk - uj)
        dv = orient * (vk - vj)
        owner += tl.where((dv < 0.0) | ((dv == 0.0) & (du > 0.0)), 1 << i, 0)
    tl.store(r + 12, 1.0 / tl.where(keep, z0, 1.0), mask=fm)  # dropped slots: never read, kept finite
    tl.store(r + 13, 1.0 / tl.where(keep, z1, 1.0), mask=fm)
    tl.store(r + 14, 1.0 / tl.where(keep, z2, 1.0), mask=fm)
    tl.store(r + 15, owner.to(tl.float64), mask=fm)


@triton_kernel
def _raster_bin_kernel(cnt_ptr, ends_ptr, rect_ptr, key_ptr, tri_ptr, NF, F, TX, TPI, CAP, BLOCK: tl.constexpr):
    # One program per block of triangles: triangle t writes its cnt[t] pairs at ends[t] - cnt[t]:
    # key = image * TPI + tile and t (both int32; the wrapper checks N * TPI and N * F fit). Pairs
    # at positions >= CAP (the buffers' length) are dropped; the caller detects that from E > CAP.
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tm = t < NF
    cnt = tl.load(cnt_ptr + t, mask=tm, other=0)
    start = tl.load(ends_ptr + t, mask=tm, other=0) - cnt
    tx0 = tl.load(rect_ptr + t * 3 + 0, mask=tm, other=0)
    ty0 = tl.load(rect_ptr + t * 3 + 1, mask=tm, other=0)
    tw = tl.load(rect_ptr + t * 3 + 2, mask=tm, other=1)
    base = (t // F) * TPI
    for k in range(0, tl.max(cnt, axis=0)):
        m = tm & (k < cnt) & (start + k < CAP)
        dy = k // tw
        key = base + (ty0 + dy) * TX + tx0 + (k - dy * tw)
        tl.store(key_ptr + start + k, key, mask=m)
        tl.store(tri_ptr + start + k, t, mask=m)


@triton_kernel
def _raster_count_kernel(cnt_ptr, rect_ptr, tc_ptr, end_ptr, list_ptr, NF, F, TX, TPI, CAP, SCATTER: tl.constexpr,
                         BLOCK: tl.constexpr):
    # Counting bin, one program per block of triangles, the same (triangle, tile) pairs as
    # _raster_bin_kernel. tc (N*TPI + 1,) int32, zeroed by the caller: tile key's counter is tc[key + 1].
    # Pass 1 (not SCATTER): tc[key + 1] += 1 per pair. The caller's cumsum of tc is end (N*TPI + 1,)
    # int64: tile key's list is [end[key], end[key + 1]). Pass 2 (SCATTER): the counters count back
    # down; the value a pair takes off, c in [1, count], gives it the slot end[key + 1] - c, so every
    # slot of [0, E) gets exactly one triangle id (in an order the atomics decide; the raster kernel's
    # result does not depend on it). Slots >= CAP (the list buffer's length) are dropped; the
    # caller detects that from E > CAP.
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tm = t < NF
    cnt = tl.load(cnt_ptr + t, mask=tm, other=0)
    tx0 = tl.load(rect_ptr + t * 3 + 0, mask=tm, other=0)
    ty0 = tl.load(rect_ptr + t * 3 + 1, mask=tm, other=0)
    tw = tl.load(rect_ptr + t * 3 + 2, mask=tm, other=1)
    base = (t // F) * TPI + 1
    for k in range(0, tl.max(cnt, axis=0)):
        m = tm & (k < cnt)
        dy = k // tw
        key1 = base + (ty0 + dy) * TX + tx0 + (k - dy * tw)  # key + 1
        if SCATTER:
            c = tl.atomic_add(tc_ptr + key1, -1, mask=m, sem="relaxed")
            slot = tl.load(end_ptr + key1, mask=m, other=0) - c
            tl.store(list_ptr + slot, t, mask=m & (slot < CAP))
        else:
            tl.atomic_add(tc_ptr + key1, 1, mask=m, sem="relaxed")


@triton_kernel
def _raster_tiles_kernel(rec_ptr, list_ptr, order_ptr, start_ptr, tri_ptr, bary_ptr, depth_ptr, mask_ptr, F, H, W,
                         TX, TPI, CAP, PERM: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    # rec (N*F, 16) f64; list (>= CAP,) int32 triangle ids t = image * F + face; PERM (sort
    # binning): in binning order, and order (E,) int64 the permutation that groups them by (image,
    # tile) (list[order[k]]); not PERM (counting bin): grouped already (list[k]), order unused.
    # start (N*TPI + 1,) int64: tile pid's entries are [start[pid], start[pid + 1]), clamped to CAP
    # (the counting bin's capacity mode: lists past the buffer, the result is discarded);
    # outputs tri (N, H, W) int64, bary (N, H, W, 3), depth (N, H, W), mask
    # (N, H, W) uint8 view of bool. One program per (image, tile).
    pid = tl.program_id(0)
    img = pid // TPI
    tile = pid - img * TPI
    ty = tile // TX
    tx = tile - ty * TX
    offs = tl.arange(0, TILE_H * TILE_W)
    row = ty * TILE_H + offs // TILE_W
    col = tx * TILE_W + offs % TILE_W
    valid = (row < H) & (col < W)
    py = row.to(tl.float64)[:, None] + 0.5  # (P, 1)
    px = col.to(tl.float64)[:, None] + 0.5
    tiny: tl.constexpr = 2.2250738585072014e-308  # torch.finfo(float64).tiny
    big: tl.constexpr = 2147483647
    best_d = tl.full((TILE_H * TILE_W,), float("inf"), tl.float64)
    best_t = tl.full((TILE_H * TILE_W,), big, tl.int32)
    lo = tl.minimum(tl.load(start_ptr + pid), CAP)
    hi = tl.minimum(tl.load(start_ptr + pid + 1), CAP)
    for s in range(lo, hi, BLOCK_T):
        k = s + tl.arange(0, BLOCK_T)
        km = k < hi
        if PERM:
            t = tl.load(list_ptr + tl.load(order_ptr + k, mask=km, other=0), mask=km, other=0)  # (T,)
        else:
            t = tl.load(list_ptr + k, mask=km, other=0)
        r = rec_ptr + t.to(tl.int64) * 16
        own = tl.load(r + 15, mask=km, other=0.0).to(tl.int32)[None, :]
        # oriented edge i at p: sdx_i * (p_v - ay_i) - sdy_i * (p_u - ax_i), inside => > 0
        e0 = (tl.load(r + 6, mask=km, other=0.0)[None, :] * (py - tl.load(r + 3, mask=km, other=0.0)[None, :])
              - tl.load(r + 9, mask=km, other=0.0)[None, :] * (px - tl.load(r + 0, mask=km, other=0.0)[None, :]))
        e1 = (tl.load(r + 7, mask=km, other=0.0)[None, :] * (py - tl.load(r + 4, mask=km, other=0.0)[None, :])
              - tl.load(r + 10, mask=km, other=0.0)[None, :] * (px - tl.load(r + 1, mask=km, other=0.0)[None, :]))
        e2 = (tl.load(r + 8, mask=km, other=0.0)[None, :] * (py - tl.load(r + 5, mask=km, other=0.0)[None, :])
              - tl.load(r + 11, mask=km, other=0.0)[None, :] * (px - tl.load(r + 2, mask=km, other=0.0)[None, :]))
        inside = (((e0 > 0.0) | ((e0 == 0.0) & ((own & 1) != 0)))
                  & ((e1 > 0.0) | ((e1 == 0.0) & ((own & 2) != 0)))
                  & ((e2 > 0.0) | ((e2 == 0.0) & ((own & 4) != 0))) & km[None, :])  # (P, T)
        # perspective-correct depth, the reference's operations: s = max(e0 + e1 + e2, tiny),
        # q_i = (e_i / s) / z_i, depth = 1 / (q0 + q1 + q2)
        ssum = tl.maximum((e0 + e1) + e2, tiny)
        qs = (((e0 / ssum) * tl.load(r + 12, mask=km, other=1.0)[None, :])
              + ((e1 / ssum) * tl.load(r + 13, mask=km, other=1.0)[None, :])) \
            + ((e2 / ssum) * tl.load(r + 14, mask=km, other=1.0)[None, :])
        d = tl.where(inside, 1.0 / tl.where(inside, qs, 1.0), float("inf"))  # qs > 0 where inside
        dmin = tl.min(d, axis=1)  # (P,)
        tmin = tl.min(tl.where(inside & (d == dmin[:, None]), t[None, :], big), axis=1)
        better = (dmin < best_d) | ((dmin == best_d) & (tmin < best_t))
        best_d = tl.where(better, dmin, best_d)
        best_t = tl.where(better, tmin, best_t)
    # the winner's barycentrics: its record gathered once per pixel, the same operations again
    cov = (best_t < big) & valid
    tb = tl.where(cov, best_t, 0)
    r = rec_ptr + tb.to(tl.int64) * 16
    pyv = row.to(tl.float64) + 0.5
    pxv = col.to(tl.float64) + 0.5
    e0 = (tl.load(r + 6, mask=cov, other=0.0) * (pyv - tl.load(r + 3, mask=cov, other=0.0))
          - tl.load(r + 9, mask=cov, other=0.0) * (pxv - tl.load(r + 0, mask=cov, other=0.0)))
    e1 = (tl.load(r + 7, mask=cov, other=0.0) * (pyv - tl.load(r + 4, mask=cov, other=0.0))
          - tl.load(r + 10, mask=cov, other=0.0) * (pxv - tl.load(r + 1, mask=cov, other=0.0)))
    e2 = (tl.load(r + 8, mask=cov, other=0.0) * (pyv - tl.load(r + 5, mask=cov, other=0.0))
          - tl.load(r + 11, mask=cov, other=0.0) * (pxv - tl.load(r + 2, mask=cov, other=0.0)))
    ssum = tl.maximum((e0 + e1) + e2, tiny)
    q0 = (e0 / ssum) * tl.load(r + 12, mask=cov, other=1.0)
    q1 = (e1 / ssum) * tl.load(r + 13, mask=cov, other=1.0)
    q2 = (e2 / ssum) * tl.load(r + 14, mask=cov, other=1.0)
    qs = tl.where(cov, (q0 + q1) + q2, 1.0)
    pix = img.to(tl.int64) * H * W + row * W + col
    dt = depth_ptr.dtype.element_ty
    mid = tl.float64 if dt == tl.float64 else tl.float32  # f64 -> f32 -> f16/bf16 (the interpreter
    # cannot cast f64 to bf16 directly; the double rounding is below the output's precision)
    tl.store(tri_ptr + pix, tl.where(cov, tb - img * F, -1).to(tl.int64), mask=valid)
    tl.store(depth_ptr + pix, tl.where(cov, best_d, 0.0).to(mid).to(dt), mask=valid)
    tl.store(mask_ptr + pix, cov.to(tl.uint8), mask=valid)
    tl.store(bary_ptr + pix * 3 + 0, tl.where(cov, q0 / qs, 0.0).to(mid).to(dt), mask=valid)
    tl.store(bary_ptr + pix * 3 + 1, tl.where(cov, q1 / qs, 0.0).to(mid).to(dt), mask=valid)
    tl.store(bary_ptr + pix * 3 + 2, tl.where(cov, q2 / qs, 0.0).to(mid).to(dt), mask=valid)


@triton_kernel
def _interpolate_kernel(attr_ptr, faces_ptr, tri_ptr, bary_ptr, mask_ptr, out_ptr, rgb_ptr, flag_ptr, P, HW, NV, F,
                        C, NA, NORMAL: tl.constexpr, F64: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_C: tl.constexpr, ABLOCK: tl.constexpr, FBLOCK: tl.constexpr):
    # attrs (N, NV, C) (NA = N*NV*C elements); faces (F, 3) int; tri (N*H*W,) int64; bary (N*H*W, 3);
    # mask uint8; out (N*H*W, C) attrs dtype; rgb like out (NORMAL only); flag (grid,) int32. Every
    # element of out / rgb is written. The grid may exceed the pixel blocks: every program also
    # checks ABLOCK attribute values (finite) and FBLOCK face indices (in range) and its pixels'
    # face ids (< F) and writes the OR of the failures to flag[program] (1 | 2 | 4).
    pid = tl.program_id(0)
    ao = pid.to(tl.int64) * ABLOCK + tl.arange(0, ABLOCK)
    av = tl.load(attr_ptr + ao, mask=ao < NA, other=0.0)
    bad = tl.max(((av - av) != 0.0).to(tl.int32), axis=0)
    fo = pid.to(tl.int64) * FBLOCK + tl.arange(0, FBLOCK)
    fv = tl.load(faces_ptr + fo, mask=fo < 3 * F, other=0)
    bad = bad | (tl.max(((fv < 0) | (fv >= NV)).to(tl.int32), axis=0) * 2)
    p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    tid = tl.load(tri_ptr + p, mask=pm, other=-1)
    bad = bad | (tl.max((tid >= F).to(tl.int32), axis=0) * 4)
    tl.store(flag_ptr + pid, bad)
    cov = pm & (tl.load(mask_ptr + p, mask=pm, other=0) != 0) & (tid >= 0) & (tid < F)
    tid = tl.where(cov, tid, 0)
    base = (p // HW) * NV
    acc_t = tl.float64 if F64 else tl.float32
    at = attr_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    m2 = cov[:, None] & cm[None, :]
    out = tl.zeros((BLOCK_P, BLOCK_C), acc_t)
    for i in tl.static_range(3):
        vi = tl.load(faces_ptr + tid * 3 + i, mask=cov, other=0)
        vi = tl.where((vi >= 0) & (vi < NV), vi, 0)  # bad ids raise after the call; no stray reads
        b = tl.load(bary_ptr + p * 3 + i, mask=cov, other=0.0)
        b = b.to(acc_t if F64 else tl.float32).to(at).to(acc_t)  # as the reference: bary -> attrs dtype
        a = tl.load(attr_ptr + (base + vi)[:, None] * C + c[None, :], mask=m2, other=0.0).to(acc_t)
        out += b[:, None] * a
    om = pm[:, None] & cm[None, :]
    dst = p[:, None] * C + c[None, :]
    if NORMAL:
        norm = tl.sqrt(tl.sum(out * out, axis=1))
        unit = out / tl.maximum(norm, 1e-12)[:, None]
        tl.store(out_ptr + dst, unit.to(at), mask=om)
        tl.store(rgb_ptr + dst, tl.where(m2, unit * 0.5 + 0.5, 0.0).to(at), mask=om)
    else:
        tl.store(out_ptr + dst, out.to(at), mask=om)


# ------------------------------------------------------------------------------------ wrappers
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


_CONST: dict = {}


def _const(kind: str, value, device: torch.device) -> torch.Tensor:
    """Small constant device tensors (``near`` as float64, tile ids) cached across calls: no fill per frame."""
    key = (kind, value, device)
    if key not in _CONST:
        if len(_CONST) > 64:
            _CONST.clear()
        _CONST[key] = (torch.full((1,), value, dtype=torch.float64, device=device) if kind == "near"
                       else torch.arange(value, dtype=torch.int32, device=device))
    return _CONST[key]


def _defaults(device: torch.device, tile, block_t, num_warps):
    """(tile, block_t, num_warps). GPU: 8x8-pixel tiles, 2 triangles per step, 4 warps (the best
    of a sweep on an H200, 4 views x 512^2 of the head: ``bench_kernels.py --raster-sweep``,
    benchmarks/results/gpu_suite_h200.txt: 0.40 ms vs 0.52 ms at 2 warps;
    larger tiles evaluate more empty pixel centres per triangle, more triangles per step cost
    registers). The interpreter (CPU, tests): 16x16 tiles and 256 triangles per step, because
    there every program and every step costs ~50 numpy calls whatever its size."""
    cuda = device.type == "cuda"
    if tile is None:
        tile = TILE if cuda else (16, 16)
    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    block_t = (2 if cuda else 256) if block_t is None else block_t
    return tile, block_t, 4 if num_warps is None else num_warps


def _binning(binning) -> str:
    """The ``binning`` argument: None -> :data:`BINNING` (read per call), else one of :data:`BINNINGS`."""
    value = BINNING if binning is None else binning
    if not isinstance(value, str) or value not in BINNINGS:
        what = "binning" if binning is not None else "rasterize_triton.BINNING"
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BINNINGS))} (or None for the default), "
                         f"got {value!r}")
    return value


def rasterize_triton(verts_pix: torch.Tensor, faces: torch.Tensor, height: int, width: int, *,
                     cull_backfaces: bool = True, near: float = 1e-4, tile=None, block_t: int | None = None,
                     num_warps: int | None = None, out=None, graph: bool | None = None, binning: str | None = None):
    """Triton rasterizer, same :class:`~mvportrait.kernels.rasterize.Fragments` as ``rasterize_ref``.

    ``verts_pix`` (N, Nv, 3) float (any float dtype; cast to float64 in the kernels), ``faces``
    (F, 3) int32 / int64. Shapes and types are the public ``rasterize``'s to check; the value
    checks of the reference (every vertex finite, face indices in range) run inside the setup
    kernel and are read back in the call's single host sync together with the pair count; on a
    failure the reference's checks run to raise their exact message. ``tile`` (int or (rows,
    cols), powers of two), ``block_t`` (triangles per inner step) and ``num_warps`` are tuning
    knobs, defaults in :func:`_defaults`. ``out``: optional preallocated contiguous Fragments of
    the right shapes / dtypes (tests poison them); every element is written.

    ``graph``: ``None`` (default) replays a CUDA graph of the no-sync pipeline where
    :func:`mvportrait.kernels._graphs.usable` allows it (CUDA, ``MVP_CUDA_GRAPHS`` not 0, no input
    that requires grad, no capture in progress) and N, F > 0; ``False`` never; ``True`` requires it
    (ValueError where it cannot be used). Same results either way (see :func:`_graphed`).

    ``binning``: ``"sort"`` or ``"count"`` (step 2 of the module docstring; bit-identical results),
    ``None`` for :data:`BINNING`; anything else raises ValueError.
    """
    binning = _binning(binning)
    use = _use_graph(graph, verts_pix, faces)
    args = (height, width, bool(cull_backfaces), float(near), tile, block_t, num_warps)
    if use:
        return _graphed(verts_pix, faces, *args, out, binning=binning)
    return _raster(verts_pix, faces, *args, out, None, binning)[0]


def rasterize_triton_no_sync(verts_pix: torch.Tensor, faces: torch.Tensor, height: int, width: int, capacity: int,
                             *, cull_backfaces: bool = True, near: float = 1e-4, tile=None, block_t: int | None = None,
                             num_warps: int | None = None, out=None, binning: str | None = None):
    """:func:`rasterize_triton` with pair buffers of a fixed ``capacity`` and no host sync.

    Every shape in it is independent of the data, so it can be captured in a CUDA graph. Returns
    ``(frags, stat)``: ``stat`` a (2,) int64 device tensor ``[E, failed input checks]``. The
    fragments are valid only when ``stat[0] <= capacity`` and ``stat[1] == 0`` -- the caller reads
    ``stat`` afterwards and otherwise reruns :func:`rasterize_triton` (which raises the reference's
    message for bad input): past ``capacity`` pairs are dropped (the writes are masked, no memory is
    touched out of bounds). With ``capacity >= E`` the result is bit-identical to the exact path.
    Extra cost over it: the sort runs over ``capacity`` keys (padding ``INT32_MAX``, sorted last);
    the counting bin (``binning="count"``) costs the same either way, ``capacity`` only sizes its list.
    Needs N, F >= 1; other arguments as for :func:`rasterize_triton`.
    """
    binning = _binning(binning)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= _INT32_MAX:
        raise ValueError(f"capacity must be an int in [1, {_INT32_MAX}], got {capacity!r}")
    if verts_pix.shape[0] == 0 or faces.shape[0] == 0:
        raise ValueError(f"rasterize_triton_no_sync needs at least one image and one face, got "
                         f"{verts_pix.shape[0]} images and {faces.shape[0]} faces")
    return _raster(verts_pix, faces, height, width, bool(cull_backfaces), float(near), tile, block_t, num_warps,
                   out, capacity, binning)


def rasterize_normal_map_triton(verts_pix: torch.Tensor, normals: torch.Tensor, faces: torch.Tensor, height: int,
                                width: int, *, cull_backfaces: bool = True, near: float = 1e-4, tile=None,
                                block_t: int | None = None, num_warps: int | None = None, graph: bool | None = None,
                                binning: str | None = None):
    """``(frags, unit, rgb)``: :func:`rasterize_triton` then :func:`normal_map_triton` on its fragments.

    Same results (and messages for bad input) as those two calls. ``normals`` (N, Nv', 3) float on
    the vertices' device; shapes and types are the caller's to check (the public
    ``rasterize_normal_map``). ``graph`` as for :func:`rasterize_triton`: where graphs are used,
    one CUDA graph replays the rasterizer's no-sync pipeline and the normal-map pass, and the call
    does one host read (:func:`_graphed`); otherwise (and for normals that require grad) the two
    calls run as they are. ``binning`` as for :func:`rasterize_triton`.
    """
    binning = _binning(binning)
    use = _use_graph(graph, verts_pix, faces)
    args = (height, width, bool(cull_backfaces), float(near), tile, block_t, num_warps)
    if use and _graphs.usable(verts_pix.device, (normals,)):
        return _graphed(verts_pix, faces, *args, None, normals, binning=binning)
    frags = (_graphed(verts_pix, faces, *args, None, binning=binning) if use
             else _raster(verts_pix, faces, *args, None, None, binning)[0])
    return (frags, *_interp(normals, faces, frags, True, None)[:2])


def _raster(verts_pix, faces, height, width, cull, near, tile, block_t, num_warps, out, capacity=None,
            binning="sort"):
    """The pipeline (module docstring). ``capacity`` None: pair buffers of exactly E after the
    host sync, returns ``(frags, E)``; an int (N, F >= 1): no sync, returns ``(frags, stat)``.
    ``binning``: "sort" or "count" (checked by the callers, :func:`_binning`)."""
    from mvportrait.kernels.rasterize import Fragments  # noqa: PLC0415 -- rasterize imports us lazily

    dev, dtype = verts_pix.device, verts_pix.dtype
    n, nv, _ = verts_pix.shape
    nf = faces.shape[0]
    (th, tw), block_t, num_warps = _defaults(dev, tile, block_t, num_warps)
    tx, ty = _cdiv(width, tw), _cdiv(height, th)
    tpi = tx * ty
    count = binning == "count"
    frags = out if out is not None else Fragments(
        tri_id=torch.empty(n, height, width, dtype=torch.int64, device=dev),
        bary=torch.empty(n, height, width, 3, dtype=dtype, device=dev),
        depth=torch.empty(n, height, width, dtype=dtype, device=dev),
        mask=torch.empty(n, height, width, dtype=torch.bool, device=dev))
    if n == 0:
        return frags, 0
    if n * max(nf, 1) > _INT32_MAX or n * tpi >= _INT32_MAX:
        raise ValueError(f"{n} images x {nf} faces (or x {tpi} tiles) exceed the Triton rasterizer's int32 ids")
    verts = verts_pix.contiguous()
    faces = faces.contiguous()
    block = 128 if dev.type == "cuda" else 4096  # the interpreter pays per program, not per element
    if nf == 0:
        _reference_checks(verts_pix, faces)
        total = 0
        rec = torch.empty(0, REC, dtype=torch.float64, device=dev)
        starts = torch.zeros(n * tpi + 1, dtype=torch.int64, device=dev) if count else None
    else:
        vblock = 4 * block
        g = max(_cdiv(nf, block), _cdiv(3 * nv, vblock))
        rec = torch.empty(n * nf, REC, dtype=torch.float64, device=dev)
        rect = torch.empty(n * nf, 3, dtype=torch.int32, device=dev)
        cnt = torch.empty(n * nf + n * g, dtype=torch.int32, device=dev)  # counts, then check flags
        launcher(_raster_setup_kernel, dev, "rasterize")[(g, n)](
            verts, faces, _const("near", near, dev), rec, rect, cnt, n, nf, nv, height, width, tx,
            CULL=cull, TILE_H=th, TILE_W=tw, BLOCK=block, VBLOCK=vblock, enable_fp_fusion=False)
        if count:  # pass 1: per-tile counts (atomics); their cumsum ends every tile's list
            tc = torch.zeros(n * tpi + 1, dtype=torch.int32, device=dev)
            launcher(_raster_count_kernel, dev, "rasterize")[(_cdiv(n * nf, block),)](
                cnt, rect, tc, tc, tc, n * nf, nf, tx, tpi, 0, SCATTER=False, BLOCK=block)
            starts = tc.cumsum(0)  # int64 [0, end of tile 0's list, ...]: tile k's list is [starts[k], starts[k+1])
            stat = torch.cat((starts[-1:], cnt[n * nf:].sum(0, keepdim=True)))  # [E, failed checks]
            vals = stat.tolist() if capacity is None else None  # the one host sync: pair count, failed checks
        else:
            ends = cnt.cumsum(0)  # int64
            if capacity is None:
                vals = ends[n * nf - 1:].tolist()  # the one host sync: pair count, then the count of failed checks
                vals = [vals[0], vals[-1] - vals[0]]
            else:
                stat = ends[n * nf - 1::n * g].clone()  # [E, E + failed checks]: the counts' end, the flags' end
                stat[1:] -= stat[:1]
        if capacity is None:
            total = vals[0]
            if vals[1]:
                _reference_checks(verts_pix, faces)
                raise ValueError("invalid rasterizer input")  # not reached: the reference checks raise
    if capacity is None and total > _INT32_MAX:
        raise ValueError(f"{total} (triangle, tile) pairs exceed int32; use larger tiles or fewer images per call")
    # exact: pair buffers sized from the actual count, nothing is dropped; capacity: fixed size,
    # (sort) padding keys INT32_MAX (> every real key) sort last and are never read, (count) slots
    # past the buffer dropped and the lists clamped to it (stat says E > capacity)
    size = total if capacity is None else capacity
    lists = torch.empty(max(size, 1), dtype=torch.int32, device=dev)
    if count:
        order = lists  # unused (PERM=False)
        if size and nf:  # pass 2: triangle ids into their tiles' lists
            launcher(_raster_count_kernel, dev, "rasterize")[(_cdiv(n * nf, block),)](
                cnt, rect, tc, starts, lists, n * nf, nf, tx, tpi, size, SCATTER=True, BLOCK=block)
    else:
        keys = (torch.empty(size, dtype=torch.int32, device=dev) if capacity is None
                else torch.full((size,), _INT32_MAX, dtype=torch.int32, device=dev))
        order = lists.new_zeros((1,), dtype=torch.int64) if size == 0 else None
        if size:
            launcher(_raster_bin_kernel, dev, "rasterize")[(_cdiv(n * nf, block),)](
                cnt, ends, rect, keys, lists, n * nf, nf, tx, tpi, size, BLOCK=block)
            keys, order = torch.sort(keys, stable=True)  # grouped by (image, tile), ascending id within one
        starts = torch.searchsorted(keys, _const("arange", n * tpi + 1, dev))
    launcher(_raster_tiles_kernel, dev, "rasterize")[(n * tpi,)](
        rec, lists, order, starts, frags.tri_id, frags.bary, frags.depth, frags.mask.view(torch.uint8),
        nf, height, width, tx, tpi, size, PERM=not count, TILE_H=th, TILE_W=tw, BLOCK_T=block_t,
        num_warps=num_warps, enable_fp_fusion=False)
    return frags, (total if capacity is None else stat)


# ----------------------------------------------------------------------------- CUDA graph path
def _use_graph(graph, verts_pix, faces) -> bool:
    """The ``graph`` argument (None | True | False) checked against what the call allows."""
    if graph not in (None, True, False):
        raise ValueError(f"graph must be None, True or False, got {graph!r}")
    use = (graph is not False and verts_pix.shape[0] > 0 and faces.shape[0] > 0
           and _graphs.usable(verts_pix.device, (verts_pix,)))
    if graph and not use:
        raise ValueError("graph=True needs CUDA tensors, MVP_CUDA_GRAPHS=1, at least one image and one face, "
                         "no input that requires grad and no CUDA graph capture in progress")
    return use



GRAPHS = _graphs.GraphCache("rasterize")  # one graph per (shapes, options, capacity, faces)
MIN_CAPACITY = 4096  # smallest pair capacity of a graph (tests lower it to force the overflow path)
_CAPACITY: dict = {}  # (shapes, options) -> pair capacity of its graphs, learned and grown


def _capacity_for(total: int) -> int:
    """A multiple of 4096 >= 1.25 E (headroom for the next frames' meshes), at least MIN_CAPACITY."""
    return min(max(MIN_CAPACITY, _cdiv(_cdiv(5 * total, 4), 4096) * 4096), _INT32_MAX)


def _fragments(n, h, w, dtype, dev, buf=None, normal_dtype=None):
    """``(buf, Fragments)``: the four outputs as views of one byte buffer (256-byte aligned parts),
    so the graph path clones its static outputs with one allocation and one copy. With
    ``normal_dtype``: ``(buf, Fragments, unit, rgb)``, the normal map's (N, H, W, 3) outputs in it too."""
    from mvportrait.kernels.rasterize import Fragments  # noqa: PLC0415

    parts = ((torch.int64, (n, h, w)), (dtype, (n, h, w, 3)), (dtype, (n, h, w)), (torch.bool, (n, h, w)))
    parts += ((normal_dtype, (n, h, w, 3)),) * 2 if normal_dtype is not None else ()
    sizes = [math.prod(shape) * dt.itemsize for dt, shape in parts]
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + _cdiv(s, 256) * 256)
    if buf is None:
        buf = torch.empty(offs[-1], dtype=torch.uint8, device=dev)
    views = [buf[o:o + s].view(dt).view(shape) for o, s, (dt, shape) in zip(offs, sizes, parts)]
    return (buf, Fragments(*views[:4]), *views[4:])


def _graphed(verts_pix, faces, height, width, cull, near, tile, block_t, num_warps, out, normals=None, *,
             binning="sort"):
    """:func:`rasterize_triton` through a CUDA graph of :func:`rasterize_triton_no_sync`; with
    ``normals``, :func:`rasterize_normal_map_triton`: the graph also runs the normal map.

    The first call of a (shapes, options, binning) key runs the exact path and sets the capacity to
    :func:`_capacity_for` its E. Later calls replay the graph of (key, capacity, faces address,
    normal map or not) (captured on first use by :class:`~mvportrait.kernels._graphs.GraphCache`,
    ``faces`` read in place as a constant, the vertices and normals copied in), queue the copy of
    the outputs (one clone of the buffer holding them all, or copies into ``out``) and then read
    ``stat`` -- the call's one host sync: ``[E, failed input checks]``, plus the count of failed
    normal-map checks (flags reduced on the device). E > capacity: the exact path reruns the call
    and the capacity grows (the next call captures a graph of the new size); failed checks: the
    exact path reruns and raises the message of ``rasterize`` / ``normal_map``. Never returns a
    result with dropped pairs, and never one that aliases the graph's buffers.
    """
    n, nv, _ = verts_pix.shape
    dev = verts_pix.device
    (th, tw), block_t, num_warps = _defaults(dev, tile, block_t, num_warps)
    args = (height, width, cull, near, (th, tw), block_t, num_warps)
    key = (n, nv, faces.shape[0], dev) + args + (binning,)  # binning: its own graphs (and capacity)
    nmap = normals is not None
    ndt = normals.dtype if nmap else None
    cap = _CAPACITY.get(key)

    def exact():  # the direct calls (exact pair buffers, host-synced checks: raise on bad input), which
        frags, total = _raster(verts_pix, faces, *args, out, None, binning)  # set or grow the capacity from E
        _CAPACITY[key] = max(cap or 0, _capacity_for(total))
        return (frags, *_interp(normals, faces, frags, True, None)[:2]) if nmap else frags

    if cap is None:  # first call of these shapes: run directly, size the pair buffers from its E
        return exact()
    consts = (_const("near", near, dev), _const("arange", n * _cdiv(width, tw) * _cdiv(height, th) + 1, dev))
    # faces are read in place (a constant, keyed by address); non-contiguous ones are copied in per call
    fc = faces.is_contiguous()
    inputs, keep = (verts_pix, normals, None if fc else faces), ((faces,) if fc else ()) + consts

    def fn(v, nm, f):
        f = faces if f is None else f
        buf, fr, *nmo = _fragments(n, height, width, v.dtype, dev, None, ndt)
        stat = _raster(v, f, *args, fr, cap, binning)[1]
        if nmap:  # the normal map's check flags reduced into stat: still one host read
            flags = _interp(nm, f, fr, True, None, tuple(nmo), check=False)[2]
            stat = torch.cat((stat, (flags != 0).sum(0, keepdim=True)))
        return buf, stat

    def finish(res):
        buf, stat = res
        if out is None:
            outs = _fragments(n, height, width, verts_pix.dtype, dev, buf.clone(), ndt)[1:]
        else:
            outs = (out,)
            src = _fragments(n, height, width, verts_pix.dtype, dev, buf)[1]
            for name in ("tri_id", "bary", "depth", "mask"):
                getattr(out, name).copy_(getattr(src, name))
        total, *bad = stat.tolist()  # the one host sync, after the copies were queued
        return (outs if nmap else outs[0]), total, any(bad)

    res, total, bad = GRAPHS.run(key + (cap, nmap), fn, inputs, keep=keep, finish=finish)
    # bad input (the direct calls raise the reference's message) or too many pairs
    return exact() if bad or total > cap else res


def _reference_checks(verts_pix, faces):
    """The reference path's value checks (their messages); only run when the kernels flagged a failure."""
    from mvportrait.kernels.rasterize import _check_faces  # noqa: PLC0415

    _check_faces(faces, verts_pix.shape[1], verts_pix.device)
    if not torch.isfinite(verts_pix).all():
        raise ValueError("verts_pix contains NaN or infinite values")


def _interp(attrs, faces, frags, normal: bool, block_p: int | None, out=None, check: bool = True):
    """``(out, rgb, flags)``; ``check``: read the flags back (one host sync) and raise on a failure."""
    n, h, w = frags.tri_id.shape
    nv, c = attrs.shape[1], attrs.shape[2]
    dev = attrs.device
    if out is None:  # one allocation for both outputs
        both = torch.empty(2 if normal else 1, n, h, w, c, dtype=attrs.dtype, device=dev)
        out, rgb = both[0], both[-1]
    else:
        out, rgb = out if normal else (out, out)
    p = n * h * w
    block_c = _next_pow2(c)
    if block_p is None:
        block_p = max(16, (4096 if dev.type != "cuda" else 1024) // block_c)
    ablock, fblock = 1024, 1024
    grid = max(_cdiv(p, block_p), _cdiv(attrs.numel(), ablock), _cdiv(faces.numel(), fblock), 1)
    flags = torch.empty(grid, dtype=torch.int32, device=dev)
    launcher(_interpolate_kernel, dev, "interpolate")[(grid,)](
        attrs.contiguous(), faces.contiguous(), frags.tri_id.contiguous(), frags.bary.contiguous(),
        frags.mask.contiguous().view(torch.uint8), out, rgb, flags, p, h * w, nv, faces.shape[0], c, attrs.numel(),
        NORMAL=normal, F64=attrs.dtype == torch.float64, BLOCK_P=block_p, BLOCK_C=block_c, ABLOCK=ablock,
        FBLOCK=fblock)
    if check and bool(flags.any()):  # one host sync (of one value); the reference checks give the message
        from mvportrait.kernels.rasterize import _check_faces, _check_ref_values  # noqa: PLC0415

        _check_faces(faces, nv, dev)
        _check_ref_values(attrs, faces, frags, ("normals contain" if normal else "attrs contains")
                          + " NaN or infinite values")
        raise ValueError("invalid fragments")  # tri_id < 0 where mask is set: not produced by rasterize
    return out, rgb, flags


def interpolate_triton(attrs: torch.Tensor, faces: torch.Tensor, frags, *, block_p: int | None = None, out=None,
                       check: bool = True):
    """``interpolate_ref`` in one Triton pass: (N, Nv, C) -> (N, H, W, C), 0 where empty.

    Shapes / types are the caller's to check. The kernel also checks the reference's values
    (finite attrs, face indices in range, fragment face ids < F), read back in one host sync
    (``check=False``: no sync, bad ids read index 0 instead). ``out``: optional preallocated
    contiguous (N, H, W, C) tensor of the attrs dtype.
    """
    return _interp(attrs, faces, frags, False, block_p, out, check)[0]


def normal_map_triton(normals: torch.Tensor, faces: torch.Tensor, frags, *, block_p: int | None = None, out=None,
                      check: bool = True):
    """``normal_map_ref`` in one Triton pass: interpolate, renormalise (|n| clamped at 1e-12), encode.

    Returns ``(unit, rgb)``, each (N, H, W, 3) in the dtype of ``normals``. Checks and ``out`` (a
    ``(unit, rgb)`` pair) as for :func:`interpolate_triton`.
    """
    return _interp(normals, faces, frags, True, block_p, out, check)[:2]
