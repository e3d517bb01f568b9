"""Text2FLAME on this CPU: time to generate 4 s of motion + expression (100 frames at 25 fps).

    python benchmarks/bench_stage1.py [--quick] [--weights DIR]

Text encoding (MiniLM, cache cleared before each call) is timed separately from sampling
(MotionDM + EmotionDM, DDIM 50 and 10 steps, classifier-free guidance: one batched call of 2 per
step per model). Writes benchmarks/results/stage1_cpu.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import row, timeit, write  # noqa: E402

from mvportrait.engine.text2flame import Text2FLAME  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--weights", help="stage-1 weights folder (default: shipped)")
    args = ap.parse_args()
    repeat = 3 if args.quick else 10
    pipe = Text2FLAME.from_pretrained(args.weights)
    preset = pipe.meta["motion"].get("preset")
    prompt = "a man nods twice, then turns to the left and smiles happily"
    cfg = {"model": preset, "seconds": 4.0, "fps": 25, "threads": torch.get_num_threads()}
    enc = pipe.text_encoder

    def encode():
        enc.clear_cache()
        pipe.encode(["a man nods twice, then turns to the left"], ["smiles happily"])

    rows = [row("stage1_text_encode", "torch", "latency", "s", timeit(encode, repeat=repeat),
                {**cfg, "encoder": enc.name})]
    m_text, e_text = pipe.encode(["a man nods twice, then turns to the left"], ["smiles happily"])
    for steps in (50, 10):
        def sample(steps=steps):
            g = torch.Generator().manual_seed(0)
            pipe.sample(pipe.motion_model, m_text, 100, steps=steps, generator=g)
            pipe.sample(pipe.emotion_model, e_text, 100, steps=steps, generator=g)

        rows.append(row("stage1_sample_4s", "torch", "latency", "s", timeit(sample, repeat=repeat),
                        {**cfg, "steps": steps}))

        def full(steps=steps):
            enc.clear_cache()
            pipe.generate(prompt, seconds=4.0, steps=steps)

        rows.append(row("stage1_generate_4s", "torch", "latency", "s", timeit(full, repeat=repeat),
                        {**cfg, "steps": steps, "includes": "split+encode+sample"}))
    path = write(rows, "stage1_cpu.json")
    for r in rows:
        print(f"{r['name']:>22} {r['config'].get('steps', '-'):>4} steps: p50 {r['p50'] * 1000:8.1f} ms  "
              f"p90 {r['p90'] * 1000:8.1f} ms")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
