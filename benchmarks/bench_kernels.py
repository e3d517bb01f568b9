"""Fused kernels vs their PyTorch references: LBS (+ normals), axis attention, rasterizer.

    python benchmarks/bench_kernels.py [--quick] [--full] [--raster-sweep] [--lbs-sweep]

Times, on whatever device is present, the reference of each op (``lbs_ref``; permute + SDPA +
permute) and, when CUDA and triton exist, the Triton path, at the shapes the engine runs:

* LBS of the 5,023-vertex ``synthetic_head(0, flame_size=True)`` (300 shape + 100 expression
  components) for 1 and 64 frames, end to end through ``lbs(...)`` (validation, the small torch
  step and the kernel; on CUDA replayed as one CUDA graph), with and without vertex normals, and
  on GPU also without the graph (``graph=False``: the same launches one by one) and as a prepared
  call (``lbs_plan``, ``triton-graph-plan``: the per-call host work cut to a few input checks, one
  batched copy, the replay and one clone). ``--lbs-sweep`` (CUDA) adds rows of the prepared call at
  1 and 64 frames for each vertex-kernel launch of ``LBS_SWEEP`` (``triton-graph-plan-sweep``).
* Axis attention on (B=1, V=4, F=8, N, C=320) with 8 heads (D=40), q/k/v sliced from one fused
  qkv tensor, along views and along frames, N = 32*32 (and 64*64 on GPU or with ``--full``); on CPU
  also the tiny UNet's axis levels ((1, 4, 8, 16*16, 64), 2 heads; (1, 4, 8, 8*8, 128), 4 heads), in
  float32 and bfloat16, permute + SDPA vs the CPU path (``impl="bmm"``, what ``auto`` runs on CPU);
  on CUDA the Triton kernel as the engine runs it (compiled per axis length and head dim) and
  ``triton-generic`` (both as run-time values, ``axis_attention.SPECIALIZE = False``).

* GroupNorm + SiLU (CUDA only) of the sd15 UNet's ResnetBlocks: (32, 320, 64, 64) and
  (32, 1280, 16, 16) bfloat16, 32 groups, ``F.group_norm`` + ``F.silu`` (``torch-ref``) vs the fused
  Triton kernel (``triton-gn``), GB/s from ``group_norm_cost``.

* Rasterizer (CUDA only; the CPU rasterizer has ``bench_rasterize_cpu.py``): 4 views x 512^2
  of the 9,976-face ``synthetic_head(0, flame_size=True)`` (one demo frame, ``ring-4`` rig),
  ``rasterize`` alone and ``rasterize`` + ``normal_map`` (what the FLAME encoder consumes),
  Triton vs ``rasterize_ref`` / ``normal_map_ref``: latency (ms) and triangles/s (N * F input
  triangles per second), each as the engine calls it (on CUDA: a CUDA graph replay) and without
  the graph (``triton-nograph``); ``triton-sortbin`` rows: the same public calls with the sort bin
  (``rasterize_triton.BINNING = "sort"`` for the call; the default is the counting bin, faster on an
  H200). ``--raster-sweep`` also prints the Triton path for other tile sizes,
  triangles per step and warp counts, and a per-kernel GPU time breakdown of both binning modes
  (not written as rows).

Each timing gives a latency row (ms) and, from the bytes/FLOPs the kernel modules document
(``lbs_cost``, ``axis_attention_cost``, ``group_norm_cost``), achieved GB/s and (attention,
group_norm) TFLOP/s rows; the reference rows use the same figures, so they read as "effective" rates. Writes
``benchmarks/results/kernels_<device-tag>.json`` (tag ``cpu`` or the GPU name).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import device_name, row, timeit, write  # noqa: E402

from mvportrait.flame.synthetic import synthetic_head  # noqa: E402
from mvportrait.kernels import lbs as lbs_k  # noqa: E402
from mvportrait.kernels import axis_attention as aa  # noqa: E402
from mvportrait.kernels.axis_attention import axis_attention, axis_attention_cost, axis_attention_ref  # noqa: E402
from mvportrait.kernels.group_norm import group_norm, group_norm_cost, group_norm_ref  # noqa: E402


def device_tag() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")


def _rows(name, backend, samples, config, nbytes, flops=None):
    """Latency row plus GB/s (and TFLOP/s) rows computed from the documented cost."""
    out = [row(name, backend, "latency", "ms", [s * 1e3 for s in samples], config)]
    out.append(row(name, backend, "bandwidth", "GB/s", [nbytes / s / 1e9 for s in samples], config))
    if flops is not None:
        out.append(row(name, backend, "compute", "TFLOP/s", [flops / s / 1e12 for s in samples], config))
    return out


def bench_lbs(dev, use_triton, repeat, sync):
    head = synthetic_head(0, flame_size=True)
    rows = []
    dtypes = (torch.float32, torch.float16) if use_triton else (torch.float32,)
    for dtype in dtypes:
        m = head.model.to(device=dev, dtype=dtype)
        dirs = m.blend_dirs(300, 100)
        basis = lbs_k.construct_joint_basis(m.j_regressor, m.v_template, dirs)
        table = lbs_k.construct_vertex_faces(m.faces, m.n_vertices)
        for frames in (1, 64):
            g = torch.Generator().manual_seed(frames)
            coeffs = torch.randn(frames, 400, generator=g).to(dev, dtype)
            pose = (torch.randn(frames, 15, generator=g) * 0.3).to(dev, dtype)
            trans = (torch.randn(frames, 3, generator=g) * 0.05).to(dev, dtype)
            args = (coeffs, pose, m.v_template, dirs, m.posedirs, m.j_regressor, m.parents, m.weights, trans)
            cfg = {"vertices": m.n_vertices, "frames": frames, "components": 400, "dtype": str(dtype).split(".")[1]}
            cost = lbs_k.lbs_cost(frames, m.n_vertices, 400, 5, dtype)
            cases = [("torch-ref", lambda: lbs_k.lbs(*args, impl="ref"), cost)]
            if use_triton:
                cost_b = lbs_k.lbs_cost(frames, m.n_vertices, 400, 5, dtype, joint_basis=True)
                # the public call as the engine makes it (on CUDA: one CUDA graph replay, the joint basis
                # and faces table cached per model), then the same launches without the graph
                cases += [("triton", lambda: lbs_k.lbs(*args, impl="triton"), cost_b),
                          ("triton-nograph", lambda: lbs_k.lbs(*args, joint_basis=basis, impl="triton", graph=False),
                           cost_b),
                          ("triton+normals", lambda: lbs_k.lbs(*args, faces=m.faces, impl="triton"), cost_b),
                          ("triton+normals-nograph",
                           lambda: lbs_k.lbs(*args, joint_basis=basis, faces=m.faces, vertex_faces=table,
                                             impl="triton", graph=False), cost_b)]
                # prepared calls (lbs_plan): validation and capture done here, per call a check of the three
                # inputs, one batched copy in, one replay, one clone out (FlameModel.forward's path on CUDA)
                # (made on first use, after the other rows)
                model = (m.v_template, dirs, m.posedirs, m.j_regressor, m.parents, m.weights)
                cases += [("triton-graph-plan", _lazy_plan(model, frames, None, coeffs, pose, trans), cost_b),
                          ("triton+normals-graph-plan", _lazy_plan(model, frames, m.faces, coeffs, pose, trans),
                           cost_b)]
            with torch.inference_mode():
                for backend, fn, c in cases:
                    s = _timed(backend, fn, repeat, sync)
                    if s is not None:
                        rows += _rows("lbs", backend, s, cfg, c["bytes"])
    return rows


LBS_SWEEP = ((32, 64, 8), (32, 32, 4), (32, 16, 4), (16, 16, 4), (16, 32, 4), (16, 64, 8), (64, 16, 4),
             (64, 32, 8))  # (BLOCK_V, BLOCK_N, num_warps) of the vertex kernel


def bench_lbs_sweep(dev, repeat, sync):
    """The prepared LBS call (fp32, 1 and 64 frames) with each vertex-kernel launch of LBS_SWEEP: a new
    plan per launch (the graph keeps the launch it captured); rows ``triton-graph-plan-sweep`` with the
    launch in their config, the built-in choice marked ``default``."""
    head = synthetic_head(0, flame_size=True)
    m = head.model.to(device=dev, dtype=torch.float32)
    dirs = m.blend_dirs(300, 100)
    model = (m.v_template, dirs, m.posedirs, m.j_regressor, m.parents, m.weights)
    rows = []
    for frames in (1, 64):
        g = torch.Generator().manual_seed(frames)
        coeffs = torch.randn(frames, 400, generator=g).to(dev)
        pose = (torch.randn(frames, 15, generator=g) * 0.3).to(dev)
        trans = (torch.randn(frames, 3, generator=g) * 0.05).to(dev)
        default = lbs_k._vertex_config(frames)
        cost = lbs_k.lbs_cost(frames, m.n_vertices, 400, 5, torch.float32, joint_basis=True)
        for launch in LBS_SWEEP:
            lbs_k.VERTEX_CONFIG = launch
            try:
                with torch.inference_mode():
                    s = _timed(f"lbs sweep {launch}", _lazy_plan(model, frames, None, coeffs, pose, trans), repeat,
                               sync)
            finally:
                lbs_k.VERTEX_CONFIG = None
            if s is None:
                continue
            cfg = {"vertices": m.n_vertices, "frames": frames, "components": 400, "dtype": "float32",
                   "block_v": launch[0], "block_n": launch[1], "num_warps": launch[2],
                   "default": launch == default}
            rows += _rows("lbs", "triton-graph-plan-sweep", s, cfg, cost["bytes"])
            print(f"lbs sweep frames={frames} block_v,block_n,warps={launch}: p50 {sorted(s)[len(s) // 2] * 1e3:.4f} ms"
                  + (" (default)" if launch == default else ""))
    return rows


FAILED: list[str] = []  # rows whose call raised (reported, skipped; the script then exits with status 1)


def _timed(backend, fn, repeat, sync, warmup=3):
    """``timeit`` of ``fn``; if the call raises, the error is printed, the row skipped (None returned)
    and the failure counted, so one broken path does not hide the other rows of a GPU run."""
    try:
        return timeit(fn, warmup=warmup, repeat=repeat, sync=sync)
    except Exception as e:  # noqa: BLE001 -- report and go on with the other rows
        print(f"warning: {backend} failed, row skipped: {type(e).__name__}: {e}", file=sys.stderr)
        FAILED.append(backend)
        return None


def _lazy_plan(model, frames, faces, coeffs, pose, trans):
    """A call of an ``lbs_plan`` made on the first call (graph when possible, as FlameModel makes it)."""
    plan = []

    def call():
        if not plan:
            plan.append(lbs_k.lbs_plan(*model, batch=frames, faces=faces, impl="triton"))
        return plan[0](coeffs, pose, trans)
    return call


def bench_axis_attention(dev, use_triton, repeat, sync, sizes):
    """sd15-width shapes (C=320, 8 heads, N = side^2); on CPU also the tiny UNet's two axis levels, and
    the CPU path (bmm, ``impl="bmm"``) beside permute + SDPA, in float32 and bfloat16 (the engine's)."""
    rows = []
    cpu = not str(dev).startswith("cuda")
    dtypes = (torch.float16, torch.bfloat16) if use_triton else (torch.float32, torch.bfloat16)
    shapes = [((1, 4, 8, side * side, 320), 8) for side in sizes]
    if cpu:
        shapes += [((1, 4, 8, 16 * 16, 64), 2), ((1, 4, 8, 8 * 8, 128), 4)]  # tiny UNet levels 1 and 2
    for dtype in dtypes:
        for shape, heads in shapes:
            c = shape[-1]
            qkv = torch.randn(*shape[:4], 3 * c, device=dev, dtype=dtype)
            q, k, v = qkv.split(c, dim=-1)
            for axis in ("view", "frame"):
                cost = axis_attention_cost(shape, axis, dtype)
                cfg = {"shape": "x".join(map(str, shape)), "heads": heads, "axis": axis,
                       "dtype": str(dtype).split(".")[1], "inputs": "slices of fused qkv"}
                cases = [("torch-permute-sdpa", lambda: axis_attention_ref(q, k, v, heads, axis))]
                if use_triton:
                    cases.append(("triton", lambda: axis_attention(q, k, v, heads, axis, impl="triton")))
                    cases.append(("triton-generic", lambda: _generic_attention(q, k, v, heads, axis)))
                if cpu:
                    cases.append(("torch-bmm (cpu path)", lambda: axis_attention(q, k, v, heads, axis, impl="bmm")))
                with torch.inference_mode():
                    for backend, fn in cases:
                        s = _timed(backend, fn, repeat, sync, warmup=2)
                        if s is not None:
                            rows += _rows("axis_attention", backend, s, cfg, cost["bytes"], cost["flops"])
    return rows


def _generic_attention(q, k, v, heads, axis):
    """The Triton kernel compiled with the axis length and head dim as run-time values (SPECIALIZE off)."""
    aa.SPECIALIZE = False
    try:
        return axis_attention(q, k, v, heads, axis, impl="triton")
    finally:
        aa.SPECIALIZE = True


def bench_group_norm(repeat, sync):
    """CUDA only: GroupNorm + SiLU of the sd15 UNet's ResnetBlocks (32 groups, bfloat16, NCHW),
    ``F.group_norm`` + ``F.silu`` vs the fused Triton kernel (``triton-gn``). GB/s from ``group_norm_cost`` (x read twice, written once)."""
    rows = []
    dtype = torch.bfloat16
    for shape in ((32, 320, 64, 64), (32, 1280, 16, 16)):
        x = torch.randn(shape, device="cuda", dtype=dtype)
        w = torch.randn(shape[1], device="cuda", dtype=dtype)
        b = torch.randn(shape[1], device="cuda", dtype=dtype)
        cost = group_norm_cost(shape, dtype, silu=True)
        cfg = {"shape": "x".join(map(str, shape)), "groups": 32, "silu": True, "dtype": "bfloat16"}
        cases = [("torch-ref", lambda: group_norm_ref(x, 32, w, b, 1e-5, silu=True)),
                 ("triton-gn", lambda: group_norm(x, 32, w, b, 1e-5, silu=True, impl="triton"))]
        with torch.inference_mode():
            for backend, fn in cases:
                s = _timed(backend, fn, repeat, sync)
                if s is not None:
                    rows += _rows("group_norm", backend, s, cfg, cost["bytes"], cost["flops"])
    return rows


def _head_views(dev, size):
    """(4, Nv, 3) [u, v, z] of the FLAME-size synthetic head seen by the ring-4 rig, and faces."""
    from mvportrait.flame.demo import demo_sequence
    from mvportrait.render.cameras import view_rig

    m = synthetic_head(0, flame_size=True).model
    with torch.inference_mode():
        verts = m(demo_sequence(1 / 25.0, 25.0), with_landmarks=False).vertices[0, 0]
    rig = view_rig("ring-4", height=size, width=size)
    pix = rig.project(verts[None].expand(4, -1, -1)).contiguous()
    normals = torch.nn.functional.normalize(torch.randn(4, pix.shape[1], 3), dim=-1)
    return pix.to(dev), m.faces.to(dev), normals.to(dev)


def bench_rasterize(dev, repeat, sync, sweep=False):
    """Triton vs reference rasterizer (+ normal map) on CUDA; [] elsewhere."""
    from mvportrait.kernels import rasterize as rast
    from mvportrait.kernels import rasterize_triton as rt

    if dev != "cuda" or not rt.triton_available():
        print("rasterizer rows skipped: they need CUDA and triton (CPU: benchmarks/bench_rasterize_cpu.py)")
        return []
    size = 512
    pix, faces, normals = _head_views(dev, size)
    n, nf = pix.shape[0], faces.shape[0]
    cfg = {"views": n, "size": f"{size}x{size}", "faces": nf, "vertices": pix.shape[1], "dtype": "float32"}

    def tri(impl, graph=None):
        return lambda: rast.rasterize(pix, faces, size, size, impl=impl, graph=graph)

    def tri_nm(impl, graph=None):  # two public calls
        def run():
            frags = rast.rasterize(pix, faces, size, size, impl=impl, graph=graph)
            return rast.normal_map(normals, faces, frags, impl=impl)
        return run

    def fused(impl, graph=None):  # the renderer's call: on CUDA one graph for both, one host read
        return lambda: rast.rasterize_normal_map(pix, normals, faces, size, size, impl=impl, graph=graph)

    def sortbin(fn):  # the same public call with the sort bin (the default binning is read per call)
        def run():
            old, rt.BINNING = rt.BINNING, "sort"
            try:
                return fn()
            finally:
                rt.BINNING = old
        return run

    rows = []
    # "triton": the public call as the engine makes it (on CUDA a CUDA graph replay + one read of the
    # pair count; with the normal map: rasterize_normal_map, both in one graph); "triton-2calls": graphed
    # rasterize, then normal_map; "triton-nograph": the same kernels launched one by one, buffers sized exactly;
    # "triton-sortbin(-nograph)": "triton(-nograph)" with the sort bin instead of the counting bin
    cases = [("rasterize", "triton", tri("triton"), repeat),
             ("rasterize", "triton-nograph", tri("triton", False), repeat),
             ("rasterize", "torch-ref", tri("ref"), 5),
             ("rasterize+normal_map", "triton", fused("triton"), repeat),
             ("rasterize+normal_map", "triton-2calls", tri_nm("triton"), repeat),
             ("rasterize+normal_map", "triton-nograph", fused("triton", False), repeat),
             ("rasterize+normal_map", "torch-ref", tri_nm("ref"), 5),
             # the sort bin (the default before the counting bin won on an H200)
             ("rasterize", "triton-sortbin", sortbin(tri("triton")), repeat),
             ("rasterize", "triton-sortbin-nograph", sortbin(tri("triton", False)), repeat),
             ("rasterize+normal_map", "triton-sortbin", sortbin(fused("triton")), repeat)]
    with torch.inference_mode():
        for name, backend, fn, rep in cases:
            s = _timed(backend, fn, rep, sync)
            if s is None:
                continue
            rows.append(row(name, backend, "latency", "ms", [x * 1e3 for x in s], cfg))
            rows.append(row(name, backend, "throughput", "Mtri/s", [n * nf / x / 1e6 for x in s], cfg))
        if sweep:
            try:  # printed only: never lose the rows
                _raster_sweep(pix, faces, normals, size, sync)
            except Exception as e:  # noqa: BLE001
                print(f"warning: --raster-sweep failed: {type(e).__name__}: {e}", file=sys.stderr)
    return rows


def _raster_sweep(pix, faces, normals, size, sync):
    """Print the Triton rasterizer's latency over its tuning knobs and a per-kernel breakdown."""
    import statistics
    import time

    from mvportrait.kernels import rasterize as rast
    from mvportrait.kernels import rasterize_triton as rt

    def p50(fn, repeat=20):
        return statistics.median(timeit(fn, warmup=2, repeat=repeat, sync=sync)) * 1e3

    configs = [(8, b, w) for b in (1, 2) for w in (1, 2, 4)] + [((8, 16), b, w) for b in (1, 2) for w in (2, 4)]
    configs += [(16, 2, 4), (16, 2, 8)]
    for tile, block_t, warps in configs:
        try:
            ms = p50(lambda: rt.rasterize_triton(pix, faces, size, size, tile=tile, block_t=block_t, num_warps=warps,
                                                 graph=False))
        except Exception as e:  # noqa: BLE001 -- e.g. too many registers for a config
            print(f"sweep tile={tile} block_t={block_t} warps={warps}: {type(e).__name__}: {e}"[:200])
            continue
        print(f"sweep tile={tile!s:>8} block_t={block_t} warps={warps}: p50 {ms:.3f} ms")
    frags = rt.rasterize_triton(pix, faces, size, size, graph=False)
    nograph = p50(lambda: rt.rasterize_triton(pix, faces, size, size, graph=False))
    print(f"breakdown (p50 ms): rasterize_triton {nograph:.3f}, "
          f"count bin {p50(lambda: rt.rasterize_triton(pix, faces, size, size, graph=False, binning='count')):.3f}, "
          f"graphed {p50(lambda: rt.rasterize_triton(pix, faces, size, size)):.3f}, "
          f"graphed count bin {p50(lambda: rt.rasterize_triton(pix, faces, size, size, binning='count')):.3f}, "
          f"public rasterize {p50(lambda: rast.rasterize(pix, faces, size, size, impl='triton')):.3f}, "
          f"normal_map_triton {p50(lambda: rt.normal_map_triton(normals, faces, frags)):.3f}, "
          f"public normal_map {p50(lambda: rast.normal_map(normals, faces, frags, impl='triton')):.3f}, "
          f"normal_map_triton unchecked {p50(lambda: rt.normal_map_triton(normals, faces, frags, check=False)):.3f}")
    sync()
    t0 = time.perf_counter()
    for _ in range(200):
        rt.normal_map_triton(normals, faces, frags, check=False)
    t1 = time.perf_counter()
    sync()
    print(f"host time per unchecked normal_map_triton call (one Triton launch + 3 allocations, no sync): "
          f"{(t1 - t0) / 200 * 1e6:.1f} us")
    from torch.profiler import ProfilerActivity, profile

    for binning in rt.BINNINGS:  # per-kernel GPU time of each binning mode (10 calls)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                f2 = rt.rasterize_triton(pix, faces, size, size, graph=False, binning=binning)
                rt.normal_map_triton(normals, faces, f2)
            sync()
        print(f"binning={binning!r}, 10 calls:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(f"{int(frags.mask.sum())} covered pixels of {frags.mask.numel()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--full", action="store_true", help="also N = 64*64 for attention on CPU")
    ap.add_argument("--raster-sweep", action="store_true", help="print the Triton rasterizer over its tuning knobs")
    ap.add_argument("--lbs-sweep", action="store_true",
                    help="(CUDA) also time the prepared LBS call with each vertex-kernel launch of LBS_SWEEP (rows)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    use_triton = cuda and lbs_k.triton_available()
    sync = torch.cuda.synchronize if cuda else None
    repeat = (20 if cuda else 3) if args.quick else (100 if cuda else 10)
    torch.manual_seed(0)
    rows = bench_lbs(dev, use_triton, repeat, sync)
    if args.lbs_sweep and use_triton:
        rows += bench_lbs_sweep(dev, repeat, sync)
    sizes = (32, 64) if (cuda or args.full) else (32,)
    rows += bench_axis_attention(dev, use_triton, max(3, repeat // 4) if not cuda else repeat, sync, sizes)
    rows += bench_rasterize(dev, repeat, sync, sweep=args.raster_sweep)
    if use_triton:
        rows += bench_group_norm(repeat, sync)
    path = write(rows, f"kernels_{device_tag()}.json")
    for r in rows:
        print(f"{r['name']:>15} {r['backend']:>26} {r['metric']:>9}: p50 {r['p50']:9.3f} {r['unit']:<7} {r['config']}")
    print(f"wrote {path} ({device_name()})")
    if FAILED:
        print(f"{len(FAILED)} rows failed: {', '.join(FAILED)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
