"""End-to-end backend parity: the same FLAME sequence, portrait and seed through every backend.

    python benchmarks/parity_backends.py [--seconds 1] [--steps 4] [--views ring-4] [--backends torch,onnxruntime,compile]

Runs ``FLAME2Video.generate`` (shipped tiny stage-2 model) once per backend on the demo FLAME sequence
and compares each backend's uint8 frames with the ``torch`` frames: mean and max absolute pixel
difference (levels, 0-255) and the share of pixels that differ by more than 2 levels. Timing per
backend lives in ``bench_backends_cpu.py`` (run it on an idle machine); this script only compares
outputs, so it can run beside other work. Writes benchmarks/results/backend_parity_cpu.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import row, write  # noqa: E402

from mvportrait.engine.backends import available_backends  # noqa: E402
from mvportrait.engine.flame2video import DEFAULT_REFERENCE, FLAME2Video  # noqa: E402
from mvportrait.export.cache import ArtifactCache  # noqa: E402
from mvportrait.flame.demo import demo_sequence  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--views", default="ring-4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", help="comma-separated (default: every available one; torch always first)")
    args = ap.parse_args()
    names = args.backends.split(",") if args.backends else available_backends()
    names = ["torch"] + [n for n in names if n != "torch"]
    flame = demo_sequence(seconds=args.seconds)
    tmp = tempfile.TemporaryDirectory()
    cache = ArtifactCache(tmp.name)
    base_cfg = {"model": "tiny (shipped weights)", "seconds": args.seconds, "views": args.views,
                "steps": args.steps, "seed": args.seed, "threads": torch.get_num_threads(),
                "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    rows, ref_frames = [], None
    for name in names:
        pipe = FLAME2Video.from_pretrained(backend=name, cache=cache)
        ctx = pipe.prepare(DEFAULT_REFERENCE)
        kw = dict(views=args.views, steps=args.steps, seed=args.seed, ref_ctx=ctx)
        frames = pipe.generate(None, flame, **kw)
        cfg = {**base_cfg, "frames": frames.shape[0], "pixels": frames.numel(), "guidance": pipe.config.guidance}
        if ref_frames is None:
            ref_frames = frames
            print(f"{name:>12}: {tuple(frames.shape)} frames", flush=True)
            continue
        d = (frames.float() - ref_frames.float()).abs()
        rows.append(row("generate_vs_torch", name, "mean_abs_pixel_diff", "levels", [d.mean().item()], cfg))
        rows.append(row("generate_vs_torch", name, "max_abs_pixel_diff", "levels", [d.max().item()], cfg))
        rows.append(row("generate_vs_torch", name, "pixels_off_by_more_than_2", "fraction",
                        [(d > 2).float().mean().item()], cfg))
        print(f"{name:>12}: vs torch mean {d.mean():.4f} max {d.max():.0f} levels, "
              f"{(d > 2).float().mean() * 100:.3f}% of pixels off by > 2", flush=True)
    path = write(rows, "backend_parity_cpu.json")
    print(f"wrote {path}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
