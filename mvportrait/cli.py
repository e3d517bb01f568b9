"""`mvportrait <command>`: the command line. It owns printing, logging setup and progress bars."""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import time
from pathlib import Path

logger = logging.getLogger("mvportrait")

RENDER_MODES = ("shaded", "normal", "depth", "mask")


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


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
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
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
