"""Fused kernels vs their PyTorch references: LBS (+ normals) and axis attention.

    python benchmarks/bench_kernels.py [--quick] [--full]

Times, on whatever device is present, the reference of each op (``lbs_ref``; permute + SDPA +
permute) and, when CUDA and triton exist, the Triton path, at the shapes the engine runs:

* LBS of the 5,023-vertex ``synthetic_head(0, flame_size=True)`` (300 shape + 100 expression
  components) for 1 and 64 frames, end to end through ``lbs(...)`` (validation, the small torch
  step and the kernel); on GPU also with a precomputed joint basis and with vertex normals.
* Axis attention on (B=1, V=4, F=8, N, C=320) with 8 heads (D=40), q/k/v sliced from one fused
  qkv tensor, along views and along frames, N = 32*32 (and 64*64 on GPU or with ``--full``).

Each timing gives a latency row (ms) and, from the bytes/FLOPs the kernel modules document
(``lbs_cost``, ``axis_attention_cost``), achieved GB/s and (attention) TFLOP/s rows; the
reference rows use the same figures, so they read as "effective" rates. Writes
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
from mvportrait.kernels.axis_attention import axis_attention, axis_attention_cost, axis_attention_ref  # noqa: E402


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
                cases += [("triton", lambda: lbs_k.lbs(*args, impl="triton"), cost),
                          ("triton+joint_basis", lambda: lbs_k.lbs(*args, joint_basis=basis, impl="triton"), cost_b),
                          ("triton+joint_basis+normals",
                           lambda: lbs_k.lbs(*args, joint_basis=basis, faces=m.faces, vertex_faces=table,
                                             impl="triton"), cost_b)]
            with torch.inference_mode():
                for backend, fn, c in cases:
                    s = timeit(fn, warmup=3, repeat=repeat, sync=sync)
                    rows += _rows("lbs", backend, s, cfg, c["bytes"])
    return rows


def bench_axis_attention(dev, use_triton, repeat, sync, sizes):
    rows = []
    dtypes = (torch.float16, torch.bfloat16) if use_triton else (torch.float32,)
    heads, c = 8, 320
    for dtype in dtypes:
        for side in sizes:
            shape = (1, 4, 8, side * side, c)
            qkv = torch.randn(*shape[:4], 3 * c, device=dev, dtype=dtype)
            q, k, v = qkv.split(c, dim=-1)
            for axis in ("view", "frame"):
                cost = axis_attention_cost(shape, axis, dtype)
                cfg = {"shape": "x".join(map(str, shape)), "heads": heads, "axis": axis,
                       "dtype": str(dtype).split(".")[1], "inputs": "slices of fused qkv"}
                cases = [("torch-permute-sdpa", lambda: axis_attention_ref(q, k, v, heads, axis))]
                if use_triton:
                    cases.append(("triton", lambda: axis_attention(q, k, v, heads, axis, impl="triton")))
                with torch.inference_mode():
                    for backend, fn in cases:
                        s = timeit(fn, warmup=2, repeat=repeat, sync=sync)
                        rows += _rows("axis_attention", backend, s, cfg, cost["bytes"], cost["flops"])
            del qkv, q, k, v
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--full", action="store_true", help="also N = 64*64 for attention on CPU")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    use_triton = cuda and lbs_k.triton_available()
    sync = torch.cuda.synchronize if cuda else None
    repeat = (20 if cuda else 3) if args.quick else (100 if cuda else 10)
    torch.manual_seed(0)
    rows = bench_lbs(dev, use_triton, repeat, sync)
    sizes = (32, 64) if (cuda or args.full) else (32,)
    rows += bench_axis_attention(dev, use_triton, max(3, repeat // 4) if not cuda else repeat, sync, sizes)
    path = write(rows, f"kernels_{device_tag()}.json")
    for r in rows:
        print(f"{r['name']:>15} {r['backend']:>26} {r['metric']:>9}: p50 {r['p50']:9.3f} {r['unit']:<7} {r['config']}")
    print(f"wrote {path} ({device_name()})")


if __name__ == "__main__":
    main()
