"""``mvportrait bench e2e``: the end-to-end benchmark (naive pipeline vs the engine, same run).

The options live here (so ``mvportrait --help`` needs no benchmark code); the measurement is
``benchmarks/bench_e2e.py`` of the source checkout, which writes rows with ``benchmarks/harness.py``
to ``benchmarks/results/``. ``python benchmarks/bench_e2e.py`` takes the same options.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

PRESETS = ("tiny", "sd15", "micro")
SAMPLERS = ("auto", "consistency", "ddim")
DTYPES = ("auto", "float32", "float16", "bfloat16")
PIPELINES = ("both", "naive", "engine")
BENCH_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_e2e.py"


def add_e2e_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--preset", default="tiny",
                   help="tiny: the shipped models (students when present); sd15: the sd15 preset with random "
                        "weights (reduce --size on a CPU); micro: a 32-px random model with a random stage 1 "
                        "(smoke tests). Default tiny")
    p.add_argument("--weights", help="stage-2 checkpoint folder instead of the preset's model")
    p.add_argument("--views", type=int, default=4, help="views (default 4)")
    p.add_argument("--size", type=int, help="image size in pixels (random-weight presets; default the preset's)")
    p.add_argument("--window", type=int, help="stage-2 window in frames (random-weight presets; default the preset's)")
    p.add_argument("--frames", type=int, default=20,
                   help="output frames per pipeline (default 20; at least window + 1 for a steady-state rate)")
    p.add_argument("--steps", type=int, help="engine stage-2 steps (default: the student's, 1 for a random-weight "
                                             "consistency stand-in, 4 DDIM steps for a teacher)")
    p.add_argument("--sampler", default="auto",
                   help="engine stage-2 sampler: auto (a student's consistency sampler when there is one or the "
                        "weights are random, else teacher DDIM), consistency, ddim")
    p.add_argument("--first-window", type=int,
                   help="the engine's first stage-2 window in frames (overlap+1 .. the window; default as the "
                        "stream's: overlap+1 with one step, else the window): fewer frames, a cheaper first call")
    p.add_argument("--prefetch", default="auto", choices=("auto", "on", "off"),
                   help="engine: admit the next window while the model call runs, the call on its own CUDA stream "
                        "(auto: off, as prepare's default)")
    p.add_argument("--stage1-steps", type=int, help="engine stage-1 steps (default: the student's, else 10)")
    p.add_argument("--naive-steps", type=int, default=25, help="naive stage-2 DDIM steps (default 25)")
    p.add_argument("--naive-stage1-steps", type=int, default=50, help="naive stage-1 DDIM steps (default 50)")
    p.add_argument("--backend", default="torch", help="engine stage-2 backend: torch (default) | compile | "
                                                       "onnxruntime | tensorrt (the naive pipeline is eager torch)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    p.add_argument("--engine-dtype", default="auto",
                   help="the engine's stage-2 precision: auto (as generate / stream: bfloat16 with the torch / "
                        "compile backend on CUDA or a CPU with oneDNN bfloat16 kernels, else float32), float32, "
                        "float16, bfloat16; the naive pipeline always uses --dtype")
    p.add_argument("--decoder", default="auto",
                   help="the engine's latent decoder: auto (the shipped student's distilled tiny decoder for the tiny "
                        "preset, the autoencoder's for the random-weight presets), full, tiny (random-weight presets: "
                        "a random tiny decoder of the shipped design, what it costs); the naive pipeline always "
                        "uses the autoencoder's")
    p.add_argument("--channels-last", default="auto",
                   help="the engine's stage-2 memory format: auto (channels_last where it measurably pays: on a "
                        "CPU, bfloat16 or float32), on, off")
    p.add_argument("--text-model", help="stage-1 text encoder: minilm, hashing or a local model folder")
    p.add_argument("--prompt", default="nods slowly, then smiles happily")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="both", help="both (default), naive or engine")
    p.add_argument("--out", help="rows JSON (default benchmarks/results/e2e[_PRESET]_{cpu|gpu}.json)")
    p.add_argument("--profile", help="torch.profiler top-ops text file (default beside --out, named after it, else "
                                     "e2e[_PRESET]_profile_{cpu|gpu}.txt; 'none' to skip)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run both pipelines in this process (faster; peak memory then includes both)")
    return p


def _int(name: str, v, lo: int, hi: int | None = None) -> None:
    if v is not None and (v < lo or (hi is not None and v > hi)):
        raise ValueError(f"--{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")


def check_e2e_args(args) -> None:
    """Every option's range / choice (ValueError naming the option and what is expected)."""
    import torch

    from mvportrait.engine.backends import BACKENDS

    if args.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    if args.sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {args.sampler!r}")
    for name in ("dtype", "engine_dtype"):
        if getattr(args, name) not in DTYPES:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(DTYPES)}, "
                             f"got {getattr(args, name)!r}")
    if getattr(args, "decoder", "auto") not in ("auto", "full", "tiny"):
        raise ValueError(f"--decoder must be one of auto, full, tiny, got {args.decoder!r}")
    if getattr(args, "channels_last", "auto") not in ("auto", "on", "off"):
        raise ValueError(f"--channels-last must be one of auto, on, off, got {args.channels_last!r}")
    if args.only not in PIPELINES:
        raise ValueError(f"--only must be one of {', '.join(PIPELINES)}, got {args.only!r}")
    if args.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    _int("views", args.views, 1, 16)
    _int("frames", args.frames, 1, 10_000)
    _int("steps", args.steps, 1, 1000)
    _int("stage1-steps", args.stage1_steps, 1, 1000)
    _int("naive-steps", args.naive_steps, 1, 1000)
    _int("naive-stage1-steps", args.naive_stage1_steps, 1, 1000)
    _int("threads", args.threads, 1, 1024)
    _int("window", args.window, 2, 32)
    _int("first-window", getattr(args, "first_window", None), 2, 32)  # (and at most the window: prepare checks)
    if args.size is not None and (args.size < 16 or args.size > 2048 or args.size & (args.size - 1)):
        raise ValueError(f"--size must be a power of two in [16, 2048], got {args.size}")
    if (args.size is not None or args.window is not None) and (args.preset == "tiny" or args.weights):
        raise ValueError("--size / --window change a random-weight preset (sd15, micro); a trained model "
                         "(--preset tiny, --weights) has its own")
    if args.weights and not (Path(args.weights) / "config.json").is_file():
        raise ValueError(f"--weights {args.weights}: no stage-2 checkpoint (config.json) in that folder")
    if args.device is not None:
        if args.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if not args.prompt or not args.prompt.strip():
        raise ValueError("--prompt must not be empty")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if not math.isfinite(args.frames):
        raise ValueError("--frames must be finite")


def load_bench():
    """benchmarks/bench_e2e.py of the source checkout, as a module."""
    if not BENCH_FILE.is_file():
        raise FileNotFoundError(f"mvportrait bench runs benchmarks/bench_e2e.py of a source checkout; "
                                f"{BENCH_FILE} is missing (installed without the repository?)")
    spec = importlib.util.spec_from_file_location("mvportrait_bench_e2e", BENCH_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cmd_e2e(args) -> int:
    check_e2e_args(args)
    return load_bench().run(args)


def register(sub) -> None:
    """Add ``bench e2e`` to the parsers built by :func:`mvportrait.cli.build_parser`."""
    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", metavar="WHAT")
    b.required = True
    s = b.add_parser("e2e", help="end to end: naive pipeline vs the engine (first frame, fps, stages, memory)")
    add_e2e_arguments(s)
    s.set_defaults(func=cmd_e2e)
