"""Reference FLAME + render path on this machine: lbs_ref, rasterize_ref, full multi-view render.

    python benchmarks/bench_flame_render_cpu.py [--quick]

Writes benchmarks/results/flame_render_cpu.json. These are the plain-PyTorch references that
the fast kernels (issue 5) are measured against.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import row, timeit, write  # noqa: E402

from mvportrait.flame.appearance import Appearance, vertex_colors  # noqa: E402
from mvportrait.flame.demo import demo_sequence  # noqa: E402
from mvportrait.flame.synthetic import synthetic_head  # noqa: E402
from mvportrait.kernels.rasterize import rasterize_ref  # noqa: E402
from mvportrait.render.cameras import view_rig  # noqa: E402
from mvportrait.render.renderer import render  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    rep = 3 if args.quick else 10
    torch.manual_seed(0)
    head = synthetic_head(0, flame_size=True)  # exactly FLAME's 5,023 vertices / 9,976 faces
    m = head.model
    rows = []
    for frames in (1, 64):
        p = demo_sequence(frames / 25.0, 25.0)
        p.shape = torch.randn(1, 300).expand(1, frames, 300).contiguous()
        with torch.inference_mode():
            s = timeit(lambda: m(p, with_landmarks=False), repeat=rep)
        rows.append(row("flame_lbs", "torch-ref", "latency", "ms", [x * 1e3 for x in s],
                        {"vertices": m.n_vertices, "frames": frames, "shape": 300, "expr": 100, "dtype": "float32"}))
    size = 256
    rig = view_rig("ring-4", height=size, width=size)
    p = demo_sequence(1 / 25.0, 25.0)
    with torch.inference_mode():
        verts = m(p).vertices[0, 0]
        pix = rig.project(verts[None].expand(4, -1, -1))  # (4, V, 3)
        s = timeit(lambda: rasterize_ref(pix, m.faces, size, size), repeat=rep)
    rows.append(row("rasterize", "torch-ref", "latency", "ms", [x * 1e3 for x in s],
                    {"views": 4, "size": f"{size}x{size}", "faces": m.n_faces}))
    colors = torch.from_numpy(vertex_colors(head, Appearance.default()))
    with torch.inference_mode():
        out = m(p)
        for impl in ("ref", "cpp"):
            for modes in (("normal", "depth", "mask"), ("shaded",)):
                s = timeit(lambda: render(out.vertices, m.faces, rig, vertex_colors=colors, modes=modes, impl=impl),
                           repeat=rep)
                rows.append(row("render_frame", "torch-ref" if impl == "ref" else "cpp", "latency", "ms",
                                [x * 1e3 for x in s], {"views": 4, "size": f"{size}x{size}", "modes": "+".join(modes)}))
    path = write(rows, "flame_render_cpu.json")
    for r in rows:
        print(f"{r['name']:>14} {r['config']}: p50 {r['p50']:.1f} {r['unit']}, p90 {r['p90']:.1f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
