"""``mvportrait stream``: text (or a FLAME sequence) -> multi-view frames streamed as they are ready.

Registered by :func:`mvportrait.cli.build_parser` through :func:`register`. Prints a live status
line (frames, fps, latency, drops, late frames) to stderr, writes the multi-view grid video at the
end (``--out``) and, with ``--raw``, every grid frame as raw RGB24 bytes to a file or stdout (``-``)
the moment it arrives (e.g. ``| ffplay -f rawvideo -pixel_format rgb24 -video_size WxH -``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def _cli():
    from mvportrait import cli

    return cli


class _Status:
    """Live one-line status on stderr, at most a few times per second."""

    def __init__(self, quiet: bool, every_s: float = 0.5):
        self.quiet, self.every_s = quiet, every_s
        self.t0 = time.monotonic()
        self.last = -float("inf")
        self.window: list[float] = []

    def frame(self, index: int, latency_s: float, stats) -> None:
        now = time.monotonic()
        self.window = [t for t in self.window if now - t < 2.0] + [now]
        if self.quiet or now - self.last < self.every_s:
            return
        self.last = now
        span = self.window[-1] - self.window[0]
        fps = (len(self.window) - 1) / span if span > 0 else 0.0
        print(f"\rframe {index + 1:5d}  {fps:5.1f} fps  latency {latency_s * 1e3:6.0f} ms  dropped {stats.dropped}"
              f"  late {stats.late}  batch {stats.mean_batch:.1f}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if not self.quiet:
            print(file=sys.stderr)


def cmd_stream(args) -> int:
    import numpy as np
    import torch

    from mvportrait.data.multiview import DEFAULT_REFERENCE_IDENTITY, identity_shape
    from mvportrait.engine.stream import StreamingEngine
    from mvportrait.engine.stream_queue import POLICIES
    from mvportrait.render.video import make_grid, write_video

    cli = _cli()
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.suffix.lower() != ".mp4":
            raise cli.CliError(f"--out must be an .mp4 file, got {out}")
        if not out.parent.exists():
            raise cli.CliError(f"output folder {out.parent} does not exist")
    texts = args.prompt or args.motion or args.emotion
    if args.flame and texts:
        raise cli.CliError("give either --flame or a text prompt (--prompt / --motion / --emotion), not both")
    if not args.flame and not texts:
        raise cli.CliError("give --prompt (or --motion / --emotion), or --flame SEQ.npz")
    if args.seconds is not None and not 0 < args.seconds <= 3600:
        raise cli.CliError(f"--seconds must be in (0, 3600], got {args.seconds}")
    if args.seconds is None and not args.flame and out is not None and not args.raw:
        raise cli.CliError("a text-driven stream has no end: give --seconds (or stop it with Ctrl-C)")
    if args.fps is not None and not 0 < args.fps <= 240:
        raise cli.CliError(f"--fps must be in (0, 240], got {args.fps}")
    for name, v in (("--steps", args.steps), ("--stage1-steps", args.stage1_steps)):
        if v is not None and not 1 <= v <= 1000:
            raise cli.CliError(f"{name} must be in [1, 1000], got {v}")
    if args.student and args.teacher:
        raise cli.CliError("give at most one of --student and --teacher")
    if args.policy not in POLICIES:
        raise cli.CliError(f"--policy must be one of {', '.join(POLICIES)}, got {args.policy!r}")
    from mvportrait.cli_stage2 import (check_backend_arg, check_run_args, decoder_arg, dtype_arg, load_flame_arg,
                                       use_student)

    reference = check_run_args(args)
    check_backend_arg(args)
    dtype = dtype_arg(args)
    shape = torch.from_numpy(identity_shape(DEFAULT_REFERENCE_IDENTITY)) if not args.reference else None
    flame = load_flame_arg(args.flame, shape) if args.flame else None

    t_start = time.perf_counter()
    engine = StreamingEngine.from_pretrained(args.weights, args.stage1_weights, device=args.device,
                                             text_model=args.text_model, stage1=flame is None, overlap=args.overlap,
                                             student=use_student(args), backend=args.backend, dtype=dtype,
                                             decoder=decoder_arg(args))
    engine.prepare(reference, args.prompt, motion=args.motion, emotion=args.emotion, flame=flame,
                   shape=shape if flame is None else None, views=args.views, fps=args.fps, seconds=args.seconds,
                   steps=args.steps, guidance=args.guidance, seed=args.seed, queue_size=args.queue,
                   policy=args.policy, realtime=not args.no_realtime, stream_batch=args.stream_batch,
                   stage1_steps=args.stage1_steps, first_window=args.first_window,
                   prefetch={"auto": None, "on": True, "off": False}[args.prefetch])
    fps = engine.settings.fps
    t_ready = time.perf_counter()
    print(f"prepared in {t_ready - t_start:.1f} s: {engine.state.views} views, {fps:g} fps, "
          f"{engine.settings.steps} steps, "
          f"stream batch {engine.settings.stream_batch}, policy {args.policy}"
          + (f", motion {engine._parts[0]!r}, emotion {engine._parts[1]!r}" if engine._parts else ""),
          file=sys.stderr)

    raw = None
    if args.raw:
        raw = sys.stdout.buffer if args.raw == "-" else open(args.raw, "wb")  # noqa: SIM115 - closed below
    grids, latencies, arrivals = [], [], []
    status = _Status(args.quiet)
    interrupted = False
    stats = None
    t0 = time.monotonic()
    try:
        with engine.stream() as frames:
            stats = frames.stats
            for frame in frames:
                grid = make_grid(frame.views[None])[0]
                if raw is not None and frame.index == 0:  # what a raw-video reader needs to know
                    print(f"raw frames: rgb24, video_size {grid.shape[1]}x{grid.shape[0]}, {fps:g} fps",
                          file=sys.stderr)
                if out is not None:
                    grids.append(grid)
                if raw is not None:
                    raw.write(grid.tobytes())
                    raw.flush()
                latencies.append(frame.timings.latency_s)
                arrivals.append(time.monotonic())
                status.frame(frame.index, frame.timings.latency_s, stats)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        status.done()
        if raw is not None and raw is not sys.stdout.buffer:
            raw.close()
    wall = time.monotonic() - t0
    n = len(latencies)
    if n == 0:
        raise cli.CliError("the stream produced no frame")
    lat = sorted(latencies)
    span = arrivals[-1] - arrivals[0]
    steady = f"{(n - 1) / span:.1f}" if n > 1 and span > 0 else "-"
    print(f"{'interrupted: ' if interrupted else ''}{n} frames in {wall:.1f} s ({steady} fps delivered after the "
          f"first frame, target {fps:g}); first frame {arrivals[0] - t0:.2f} s after start; latency p50 "
          f"{lat[n // 2] * 1e3:.0f} ms, p90 {lat[min(n - 1, int(n * 0.9))] * 1e3:.0f} ms; compute {stats.produce_fps:.1f} "
          f"fps; dropped {stats.dropped}, late {stats.late} ({stats.slip_s:.1f} s behind); mean stream batch "
          f"{stats.mean_batch:.2f}", file=sys.stderr)
    if out is not None:
        write_video(out, np.stack(grids), fps=fps)
        print(f"wrote {out}", file=sys.stderr if args.raw == "-" else sys.stdout)
    return 130 if interrupted else 0


def register(sub) -> None:
    """Add the ``stream`` subcommand to the parsers built by :func:`mvportrait.cli.build_parser`."""
    from mvportrait.cli_stage2 import DTYPE_HELP

    s = sub.add_parser("stream", help="stream multi-view frames as they are ready (live fps and latency)")
    s.add_argument("--prompt", help='e.g. "nods slowly, then smiles" (split into motion and emotion parts)')
    s.add_argument("--motion", help="motion text (overrides the prompt's motion part)")
    s.add_argument("--emotion", help="emotion text (overrides the prompt's emotion part)")
    s.add_argument("--flame", help="drive with a FLAME sequence .npz instead of text")
    s.add_argument("--reference", help="reference portrait (default: the shipped synthetic portrait)")
    s.add_argument("--views", default="ring-4", help="view rig: front, ring-N, arc-N, yaws:0,45,-45 (default ring-4)")
    s.add_argument("--fps", type=float, help="output frame rate (default: the stage-2 model's)")
    s.add_argument("--seconds", type=float, help="stream length (default: the FLAME sequence; text: until Ctrl-C)")
    s.add_argument("--steps", type=int, help="stage-2 steps per window (default: the student's, else 4 DDIM steps)")
    s.add_argument("--stream-batch", type=int, help="windows denoised together at different steps (default: steps)")
    s.add_argument("--first-window", type=int,
                   help="frames of the first stage-2 window, overlap+1 .. the model's window (default with one step: "
                        "overlap+1, the cheapest first model call, the first frame soonest; with more steps, or "
                        "given the window: the offline pipeline's layout)")
    s.add_argument("--prefetch", default="auto", choices=("auto", "on", "off"),
                   help="admit the next window (stage 1, render, noise) while the model call runs, the call on its "
                        "own CUDA stream (auto: off for now; on an H200 +25%% frame sets/s)")
    s.add_argument("--stage1-steps", type=int, help="stage-1 steps (default: the students', else 10 DDIM steps)")
    s.add_argument("--student", action="store_true",
                   help="the distilled students (mvportrait/weights/stage2_student, stage1/*_student): "
                        "consistency sampling, guidance folded in (the default)")
    s.add_argument("--teacher", action="store_true", help="the full-step teachers (DDIM with guidance)")
    s.add_argument("--decoder", default="auto", help="latent decoder: auto (default: the student's distilled tiny "
                                                     "decoder, ~8x faster decoding, ~0.75 dB lower PSNR) | full (the "
                                                     "autoencoder's) | tiny")
    s.add_argument("--guidance", type=float, help="image-guidance scale (default: the model's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--policy", default="lossless", help="lossless (default: wait for the consumer) | latest (drop)")
    s.add_argument("--queue", type=int, default=8, help="output queue size in frames (default 8)")
    s.add_argument("--no-realtime", action="store_true", help="do not pace to --fps: as fast as it computes")
    s.add_argument("--overlap", type=int, help="stage-2 window overlap in frames (default 2)")
    s.add_argument("--weights", help="stage-2 model folder (default: the shipped one)")
    s.add_argument("--stage1-weights", help="stage-1 weights folder (default: the shipped one)")
    s.add_argument("--text-model", help="local text-encoder folder (default: package / MVP_TEXT_MODEL)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--backend", help="torch | compile | onnxruntime | tensorrt, or per stage: "
                                      "stage1=torch,stage2=onnxruntime (default: MVP_BACKEND, else torch)")
    s.add_argument("--dtype", default="auto", help=DTYPE_HELP + " (default auto)")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("--out", default="stream.mp4", help="multi-view grid video written at the end ('' for none)")
    s.add_argument("--raw", "--show", dest="raw", metavar="FILE",
                   help="also write every grid frame as raw RGB24 bytes, as it comes, to a file or - (stdout), e.g. "
                        "`--show - | ffplay -f rawvideo -pixel_format rgb24 -video_size WxH -`")
    s.add_argument("--quiet", action="store_true", help="no live status line")
    s.set_defaults(func=cmd_stream)
