"""Stage-2 denoiser call per backend on this CPU: time per frame (all views).

    python benchmarks/bench_backends_cpu.py [--model tiny|micro|PATH] [--quick] [--backends torch,onnxruntime]

One denoiser call = ``FLAME2VideoModel.denoise`` on a (1, V, F) window of latents with image guidance
(the UNet runs once on the batch-doubled [cond; uncond] input), exactly what ``FLAME2Video`` calls per
DDIM step. time per frame = call time / F (all V views of a frame). Also timed per backend: the
autoencoder decode of one frame (all views) and the reference preparation (once per identity).

Backends: every one of torch, compile, onnxruntime, tensorrt that can run here (``available_backends``);
exports and compiled kernels are built before timing (warm-up calls). The model is ``tiny`` (the shipped
stage-2 weights when present, else the tiny preset with random weights: the same graph and cost) or
``micro`` (the 32-px test model). Writes benchmarks/results/backends_cpu.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import row, timeit, write  # noqa: E402

from mvportrait.engine.backends import available_backends, stage2_model  # noqa: E402
from mvportrait.export.cache import ArtifactCache  # noqa: E402
from mvportrait.models.stage2 import FLAME2VideoModel  # noqa: E402


def load_model(name: str):
    from mvportrait.config import AutoencoderConfig, Stage2Config, UNetConfig
    from mvportrait.engine.flame2video import DEFAULT_WEIGHTS

    if name == "tiny" and (DEFAULT_WEIGHTS / "config.json").is_file():
        return FLAME2VideoModel.from_pretrained(DEFAULT_WEIGHTS), "tiny (shipped weights)"
    torch.manual_seed(0)
    if name == "tiny":
        return FLAME2VideoModel.from_name("tiny").eval(), "tiny (preset, random weights)"
    if name == "micro":
        unet = UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(False, True), head_dim=8,
                          cross_attention_dim=16, norm_groups=4, temporal_attentions=1, flame_widths=(4, 8, 8))
        ae = AutoencoderConfig(block_out=(8, 16, 16), layers_per_block=1, norm_groups=4, mid_attention=False)
        cfg = Stage2Config(autoencoder=ae, unet=unet, image_size=32, views=2, frames=2, image_tokens=4,
                           image_embed_width=8, prediction="v_prediction", guidance=2.0)
        return FLAME2VideoModel(cfg).eval(), "micro (32 px test config, random weights)"
    return FLAME2VideoModel.from_pretrained(name), f"checkpoint {name}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="tiny (default), micro, or a stage-2 checkpoint folder")
    ap.add_argument("--backends", help="comma-separated subset (default: every available one)")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--guidance", type=float, help="image guidance (default: the model's)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--cache", help="artifact cache folder (default: a temporary one)")
    args = ap.parse_args()
    repeat = 3 if args.quick else 10
    model, note = load_model(args.model)
    cfg = model.config
    guidance = cfg.guidance if args.guidance is None else args.guidance
    names = args.backends.split(",") if args.backends else available_backends()
    tmp = tempfile.TemporaryDirectory() if not args.cache else None
    cache = ArtifactCache(args.cache or tmp.name)
    g = torch.Generator().manual_seed(0)
    nv, nf = args.views, cfg.frames
    ref = torch.rand(1, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    lat = torch.randn(model.latent_shape(1, views=nv), generator=g)
    renders = torch.rand(1, nv, nf, cfg.unet.flame_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([500])
    from mvportrait.export.cache import library_versions

    libs = {k: v for k, v in library_versions("onnxruntime", "tensorrt").items() if v}
    base = {"model": note, "views": nv, "frames": nf, "image_size": cfg.image_size, "guidance": guidance,
            "threads": torch.get_num_threads(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2), **libs}
    rows = []
    for name in names:
        m = stage2_model(model, name, cache=cache, views=nv)
        with torch.inference_mode():
            ctx = m.prepare_reference(ref)
            feats = m.encode_renders(renders)

            def denoise():
                m.denoise(lat, t, feats, ctx, guidance=guidance)

            def decode():
                m.autoencoder.decode(lat[0, :, 0])

            def prepare():
                m.prepare_reference(ref)

            call = timeit(denoise, warmup=2, repeat=repeat)
            rows.append(row("stage2_denoise_call", name, "time_per_frame", "s", [c / nf for c in call],
                            {**base, "per": "frame (all views), one guided UNet call / frames"}))
            rows.append(row("stage2_decode_frame", name, "time_per_frame", "s", timeit(decode, warmup=2, repeat=repeat),
                            {**base, "per": "frame (all views)"}))
            rows.append(row("stage2_prepare_reference", name, "latency", "s", timeit(prepare, warmup=1, repeat=repeat),
                            {**base, "per": "identity"}))
        print(f"{name:>12}: denoiser {rows[-3]['p50'] * 1000:8.1f} ms/frame (p90 {rows[-3]['p90'] * 1000:.1f}), "
              f"decode {rows[-2]['p50'] * 1000:7.1f} ms/frame, prepare {rows[-1]['p50'] * 1000:7.1f} ms", flush=True)
    path = write(rows, "backends_cpu.json")
    print(f"wrote {path} ({note}; backends {', '.join(names)})")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
