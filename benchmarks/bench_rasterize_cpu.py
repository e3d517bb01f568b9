"""C++ CPU rasterizer vs the PyTorch reference: rasterize and the full normal+depth+mask render.

    python benchmarks/bench_rasterize_cpu.py [--quick] [--repeat N]

Synthetic FLAME-size head (5,023 vertices, 9,976 faces), one demo frame, ring of 4 views at
256^2 and 512^2. Rows: rasterize_ref (torch-ref) with torch's default threads and with 1 torch
thread, the C++ path with the default thread count (std::thread::hardware_concurrency) and with
1 thread, and ``render(..., modes=normal+depth+mask)`` with ``impl="ref"`` / ``impl="cpp"``.
The 1-thread pair is the per-core comparison, and the stable one on a machine shared with
other jobs (multi-threaded torch ops stall there when a thread is descheduled). Writes benchmarks/results/rasterize_cpu.json and prints
the speed-ups (p50 over p50). Samples of all variants are interleaved round by round, so load
from other processes hits them alike; on a busy machine compare medians, not single runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import row, timeit, write  # noqa: E402

from mvportrait.flame.demo import demo_sequence  # noqa: E402
from mvportrait.flame.synthetic import synthetic_head  # noqa: E402
from mvportrait.kernels import cpu  # noqa: E402
from mvportrait.kernels.rasterize import rasterize, rasterize_ref  # noqa: E402
from mvportrait.render.cameras import view_rig  # noqa: E402
from mvportrait.render.renderer import render  # noqa: E402

MODES = ("normal", "depth", "mask")


def one_thread(fn):
    """fn run with torch limited to one intra-op thread."""
    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)
    return run


def interleaved(cases: dict, rounds: int, warmup: int = 2) -> dict:
    """{name: fn} -> {name: [seconds]}: one call of each case per round, in turn."""
    for fn in cases.values():
        timeit(fn, warmup=warmup - 1, repeat=1)
    out = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            out[k] += timeit(fn, warmup=0, repeat=1)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--repeat", type=int, default=None, help="rounds per size (default 30, --quick 5)")
    args = ap.parse_args()
    if not cpu.available():
        sys.exit(f"error: {cpu.build_hint()}")
    rounds = args.repeat or (5 if args.quick else 30)
    m = synthetic_head(0, flame_size=True).model
    with torch.inference_mode():
        verts = m(demo_sequence(1 / 25.0, 25.0), with_landmarks=False).vertices  # (1, 1, Nv, 3)
    faces = m.faces
    threads = cpu.hardware_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run: other jobs share the CPU, timings are provisional "
              "(compare ratios from the same run; rerun on an idle machine for the record)")
    rows, summary = [], []
    for size in (256, 512):
        rig = view_rig("ring-4", height=size, width=size)
        pix = rig.project(verts[0, 0][None].expand(4, -1, -1)).contiguous()  # (4, Nv, 3) float32
        cfg = {"views": 4, "size": f"{size}x{size}", "faces": int(faces.shape[0]), "dtype": "float32"}
        cases = {
            "ref": lambda: rasterize_ref(pix, faces, size, size),
            "ref-1t": one_thread(lambda: rasterize_ref(pix, faces, size, size)),
            "cpp": lambda: rasterize(pix, faces, size, size, impl="cpp"),
            "cpp-1t": lambda: cpu.rasterize(pix, faces, size, size, num_threads=1),
            "render-ref": lambda: render(verts, faces, rig, modes=MODES, impl="ref"),
            "render-cpp": lambda: render(verts, faces, rig, modes=MODES, impl="cpp"),
            "render-ref-1t": one_thread(lambda: render(verts, faces, rig, modes=MODES, impl="ref")),
            "render-cpp-1t": one_thread(lambda: render(verts, faces, rig, modes=MODES, impl="cpp")),
        }
        with torch.inference_mode():
            # the reference's slow large-image cases get fewer rounds
            samples = interleaved(cases, rounds if size == 256 else max(3, rounds // 3))
        ms = {k: [x * 1e3 for x in v] for k, v in samples.items()}
        rows += [
            row("rasterize", "torch-ref", "latency", "ms", ms["ref"], {**cfg, "threads": torch.get_num_threads()}),
            row("rasterize", "torch-ref", "latency", "ms", ms["ref-1t"], {**cfg, "threads": 1}),
            row("rasterize", "cpp", "latency", "ms", ms["cpp"], {**cfg, "threads": threads}),
            row("rasterize", "cpp", "latency", "ms", ms["cpp-1t"], {**cfg, "threads": 1}),
            row("render_frame", "torch-ref", "latency", "ms", ms["render-ref"],
                {**cfg, "modes": "+".join(MODES), "threads": torch.get_num_threads()}),
            row("render_frame", "cpp", "latency", "ms", ms["render-cpp"],
                {**cfg, "modes": "+".join(MODES), "threads": threads}),
            row("render_frame", "torch-ref", "latency", "ms", ms["render-ref-1t"],
                {**cfg, "modes": "+".join(MODES), "threads": 1}),
            row("render_frame", "cpp", "latency", "ms", ms["render-cpp-1t"],
                {**cfg, "modes": "+".join(MODES), "threads": f"torch 1, C++ {threads}"}),
        ]
        p50 = {k: statistics.median(v) for k, v in ms.items()}  # = the rows' p50
        summary.append(
            f"{size}x{size} x4 views | rasterize: ref {p50['ref']:.2f} ms vs cpp ({threads} threads) {p50['cpp']:.2f} ms"
            f" = {p50['ref'] / p50['cpp']:.1f}x; 1 thread each: ref {p50['ref-1t']:.2f} ms vs cpp {p50['cpp-1t']:.2f} ms"
            f" = {p50['ref-1t'] / p50['cpp-1t']:.1f}x | render normal+depth+mask: ref {p50['render-ref']:.2f} ms vs "
            f"cpp {p50['render-cpp']:.2f} ms = {p50['render-ref'] / p50['render-cpp']:.1f}x; 1 torch thread: ref "
            f"{p50['render-ref-1t']:.2f} ms vs cpp {p50['render-cpp-1t']:.2f} ms = "
            f"{p50['render-ref-1t'] / p50['render-cpp-1t']:.1f}x")
        if size == 256:  # issue 5 target: the C++ path >= 20x the reference at 4 views x 256^2
            for label, ref_k, cpp_k in ((f"{threads} threads", "ref", "cpp"), ("1 thread", "ref-1t", "cpp-1t")):
                ratio = p50[ref_k] / p50[cpp_k]
                summary.append(f"256x256 x4 views rasterize speed-up, {label}: {ratio:.1f}x (target >= 20x: "
                               f"{'met' if ratio >= 20 else 'NOT met'})")
    path = write(rows, "rasterize_cpu.json")
    for r in rows:
        print(f"{r['name']:>13} {r['backend']:>9} {r['config']}: p50 {r['p50']:.2f} {r['unit']}, p90 {r['p90']:.2f}")
    print("\n".join(summary))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
