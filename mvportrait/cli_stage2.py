"""Stage-2 commands of the command line: ``train stage2``, ``generate``, ``eval stage2``.

Kept beside :mod:`mvportrait.cli` (which registers them through :func:`register`) so the main
module stays small; printing and progress bars live here as in the rest of the CLI.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _cli():
    from mvportrait import cli

    return cli


def cmd_train_stage2(args) -> int:
    from mvportrait.config import STAGE2_PRESETS
    from mvportrait.train.stage2 import STAGES, train_stage2

    cli = _cli()
    if args.config not in STAGE2_PRESETS:
        raise cli.CliError(f"--config must be one of {', '.join(STAGE2_PRESETS)}, got {args.config!r}")
    if args.stage not in STAGES + ("all",):
        raise cli.CliError(f"--stage must be one of {', '.join(STAGES + ('all',))}, got {args.stage!r}")
    stages = STAGES if args.stage == "all" else (args.stage,)

    def per_stage(name, text, conv):
        """'8' -> same for every stage; '64,64,16,8' -> one value per stage run."""
        return cli.per_item_values(name, text, stages, conv)

    stage_over: dict[str, dict] = {s: {} for s in stages}
    if args.batch is not None:
        for s, v in per_stage("batch", args.batch, int).items():
            stage_over[s]["batch"] = v
    overrides = cli.int_options(args, ("steps", "pool_size", "checkpoint_every", "frame_stride"))
    if args.lr is not None:
        if not args.lr > 0:
            raise cli.CliError(f"--lr must be > 0, got {args.lr}")
        overrides["lr"] = args.lr
    budget = per_stage("time-budget", args.time_budget, float) if args.time_budget is not None else None
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise cli.CliError(f"--device {args.device}: CUDA is not available on this machine")
    command = "mvportrait " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(
        ("mvportrait", "__main__.py", "cli.py")) else None
    t0 = time.perf_counter()
    summary = train_stage2(args.stage, args.out, preset=args.config, device=args.device, seed=args.seed,
                           resume=args.resume, overrides=overrides, init=args.init,
                           on_phase=cli._bar_phase(args.quiet), command=command, time_budget_s=budget,
                           stage_overrides=stage_over)
    for st, m in summary["stages"].items():
        loss = (m["final_loss"] or {}).get("loss")
        print(f"stage2/{st}: {m['steps']} steps in {m['wall_s']:.0f} s, final loss {loss}")
    print(f"trained stage 2 ({args.config}, {args.stage}) in {time.perf_counter() - t0:.0f} s "
          f"-> {Path(args.out) / 'final'}")
    return 0


def _progress_bar(desc: str, quiet: bool):
    from tqdm import tqdm

    state = {"bar": None}

    def update(done: int, total: int):
        if state["bar"] is None:
            state["bar"] = tqdm(total=total, desc=desc, disable=quiet or None, dynamic_ncols=True, file=sys.stderr)
        bar = state["bar"]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return update


def check_run_args(args) -> Path:
    """Shared checks of ``generate`` and ``stream``: --views, --threads, --device, --reference.
    Returns the reference image path (the shipped portrait when none is given)."""
    import torch

    from mvportrait.engine.flame2video import DEFAULT_REFERENCE
    from mvportrait.render.cameras import parse_view_spec

    cli = _cli()
    try:
        parse_view_spec(args.views)
    except ValueError as e:
        raise cli.CliError(f"--views: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise cli.CliError(f"--device {args.device}: CUDA is not available on this machine")
    reference = Path(args.reference) if args.reference else DEFAULT_REFERENCE
    if not reference.is_file():
        raise cli.CliError(f"reference image {reference} does not exist")
    return reference


DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = ("stage-2 network precision: auto | float32 | bfloat16 (fast on CPUs with bfloat16 instructions and "
              "on GPUs) | float16 (GPU). auto: bfloat16 with the torch / compile backend on a GPU or a CPU with "
              "bfloat16 kernels (same quality for the shipped student, ~2x faster on such a CPU), else float32")


def dtype_arg(args):
    """``--dtype`` as a torch dtype (CliError for an unknown name); ``auto`` resolved for ``--device`` and the
    stage-2 backend (:func:`mvportrait.engine.flame2video.auto_dtype`)."""
    import torch

    if args.dtype not in DTYPES:
        raise _cli().CliError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    from mvportrait import envs
    from mvportrait.engine.flame2video import auto_dtype

    spec = getattr(args, "backend", None) or envs.backend()
    try:
        backend = envs.parse_backend_spec(spec)["stage2"]
    except ValueError as e:
        raise _cli().CliError(str(e)) from None
    return auto_dtype(args.device, backend)


def check_backend_arg(args) -> None:
    """``--backend`` (else MVP_BACKEND) parsed and every backend it names usable on ``--device``."""
    from mvportrait import envs
    from mvportrait.engine.backends import BackendUnavailable, check_backend

    try:
        stages = envs.parse_backend_spec(args.backend) if args.backend else envs.parse_backend_spec(envs.backend())
        for name in set(stages.values()):
            check_backend(name, args.device)
    except (ValueError, BackendUnavailable) as e:
        raise _cli().CliError(f"--backend: {e}") from None


def cmd_generate(args) -> int:
    import torch

    from mvportrait.data.multiview import DEFAULT_REFERENCE_IDENTITY, identity_shape
    from mvportrait.engine.flame2video import FLAME2Video
    from mvportrait.render.video import make_grid, write_video

    cli = _cli()
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise cli.CliError(f"--out must be an .mp4 file, got {out}")
    if not out.parent.exists():
        raise cli.CliError(f"output folder {out.parent} does not exist")
    if args.flame and (args.prompt or args.motion or args.emotion):
        raise cli.CliError("give either --flame or a text prompt (--prompt / --motion / --emotion), not both")
    if not args.flame and not (args.prompt or args.motion or args.emotion):
        raise cli.CliError("give --prompt (or --motion / --emotion), or --flame SEQ.npz")
    if not 0 < args.seconds <= 120:
        raise cli.CliError(f"--seconds must be in (0, 120], got {args.seconds}")
    for name in ("steps", "stage1_steps"):
        v = getattr(args, name)
        if v is not None and not 1 <= v <= 1000:
            raise cli.CliError(f"--{name.replace('_', '-')} must be in [1, 1000], got {v}")
    if args.student and args.teacher:
        raise cli.CliError("give at most one of --student and --teacher")
    student = use_student(args)
    reference = check_run_args(args)
    # identity shape: known for the shipped portrait (a corpus identity), the mean head otherwise
    shape = torch.from_numpy(identity_shape(DEFAULT_REFERENCE_IDENTITY)) if not args.reference else None
    check_backend_arg(args)
    t_start = time.perf_counter()
    pipe = FLAME2Video.from_pretrained(args.weights, student=student, device=args.device, backend=args.backend,
                                       dtype=dtype_arg(args), decoder=decoder_arg(args))
    try:
        ctx = pipe.prepare(reference)
    except ValueError as e:
        raise cli.CliError(str(e)) from None
    if args.flame:
        flame = load_flame_arg(args.flame, shape)
        parts = None
    else:
        from mvportrait.engine.text2flame import Text2FLAME

        t2f = Text2FLAME.from_pretrained(args.stage1_weights, student=student, device="cpu", backend=args.backend)
        flame = t2f.generate(args.prompt or "", motion=args.motion, emotion=args.emotion, seconds=args.seconds,
                             fps=25.0, seed=args.seed, steps=args.stage1_steps,
                             shape=shape if shape is not None else None)
        parts = t2f.last_timings.extra["parts"]
        print(f"stage 1: motion {parts[0]!r}, emotion {parts[1]!r}: {flame.num_frames} frames "
              f"({t2f.last_timings.encode_s + t2f.last_timings.motion_s + t2f.last_timings.emotion_s:.1f} s)")
    frames = pipe.generate(None, flame, views=args.views, steps=args.steps, guidance=args.guidance, seed=args.seed,
                           ref_ctx=ctx, on_progress=_progress_bar("stage 2 denoising", args.quiet))
    t = pipe.last_timings
    grid = make_grid(frames.numpy())
    write_video(out, grid, fps=pipe.fps)
    written = [str(out)]
    if args.per_view:
        for v in range(frames.shape[1]):
            p = out.with_name(f"{out.stem}_view{v}{out.suffix}")
            write_video(p, frames[:, v].numpy(), fps=pipe.fps)
            written.append(str(p))
    n = frames.shape[0]
    kind = "consistency (student)" if pipe.is_student else "DDIM"
    print(f"stage 2 ({pipe.backend}): {n} frames x {frames.shape[1]} views at {pipe.fps:g} fps, "
          f"{t.extra.get('steps')} {kind} steps: render "
          f"{t.render_s:.1f} s, denoise {t.denoise_s:.1f} s, decode {t.decode_s:.1f} s "
          f"({(t.denoise_s + t.decode_s) / max(1, n):.2f} s per frame, all views)")
    print(f"wrote {', '.join(written)} in {time.perf_counter() - t_start:.0f} s")
    return 0


# ``generate`` and ``stream`` use the distilled students unless --teacher is given when this is True (set
# from the students' quality report, mvportrait/weights/stage2_student/MODEL_CARD.md: the stage-2 student
# is within 1 dB of its teacher at 1 and 2 steps, with better SSIM and less flicker at 1 step; the stage-1
# students are within 3 points of their teachers' control accuracy).
DEFAULT_TO_STUDENT = True


DECODER_HELP = ("latent decoder: full (default: the autoencoder's) | auto (the model folder's distilled tiny decoder "
                "when it has one, as the shipped student does: ~8x faster decoding, ~0.75 dB lower PSNR) | tiny")


def decoder_arg(args) -> str:
    """--decoder checked: auto | full | tiny."""
    from mvportrait.engine.flame2video import DECODERS

    value = getattr(args, "decoder", None) or "full"
    if value not in DECODERS:
        raise _cli().CliError(f"--decoder must be one of {', '.join(DECODERS)}, got {value!r}")
    return value


def use_student(args) -> bool:
    """--student / --teacher, else :data:`DEFAULT_TO_STUDENT` for the shipped weights; with a
    ``--weights`` / ``--stage1-weights`` folder the default is that folder's model (a student folder is
    recognised as one whatever the flag)."""
    if getattr(args, "student", False):
        return True
    if getattr(args, "teacher", False):
        return False
    return DEFAULT_TO_STUDENT and getattr(args, "weights", None) is None and getattr(args, "stage1_weights", None) is None


def load_flame_arg(path, shape):
    """The ``--flame`` sequence file, with the reference identity's ``shape`` when given (None: as stored)."""
    from mvportrait import cli
    from mvportrait.flame import io as flame_io

    try:
        flame = flame_io.load_sequence(path)
    except (ValueError, KeyError, OSError) as e:
        raise cli.CliError(f"--flame {path}: {e}") from None
    return flame if shape is None else _with_shape(flame, shape)


def _with_shape(flame, shape):
    import torch

    from mvportrait.flame.params import FlameParams

    n = flame.shape.shape[-1]
    s = torch.zeros(n)
    k = min(n, shape.shape[-1])
    s[:k] = shape[:k]
    kw = {f: getattr(flame, f) for f in ("expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose",
                                          "translation")}
    return FlameParams(shape=s.expand_as(flame.shape).clone(), fps=flame.fps, **kw)


def cmd_eval_stage2(args) -> int:
    import torch

    from mvportrait.engine.flame2video import FLAME2Video
    from mvportrait.evaluation.stage2 import comparison_sheet, evaluate_stage2
    from mvportrait.fileio import atomic_write
    from mvportrait.render.video import write_image

    cli = _cli()
    if args.n < 1 or (args.steps is not None and not 1 <= args.steps <= 1000):
        raise cli.CliError("--n must be >= 1 and --steps in [1, 1000]")
    if args.pictures < 0:
        raise cli.CliError(f"--pictures must be >= 0, got {args.pictures}")
    if args.frames is not None and args.frames < 1:
        raise cli.CliError(f"--frames must be >= 1, got {args.frames}")
    picture = args.picture if args.pictures and args.picture else None
    if picture and not Path(picture).resolve().parent.is_dir():  # before the evaluation, not after it
        raise cli.CliError(f"cannot write {picture}: directory {Path(picture).parent} does not exist "
                           f"(or pass --pictures 0)")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = FLAME2Video.from_pretrained(args.weights, student=args.student, device=args.device, dtype=dtype_arg(args),
                                       decoder=decoder_arg(args))
    steps = pipe.default_steps if args.steps is None else args.steps
    if args.first_window is not None and not pipe.overlap < args.first_window <= pipe.window:
        raise cli.CliError(f"--first-window must be in [{pipe.overlap + 1}, {pipe.window}] (overlap + 1 .. the "
                           f"model's window), got {args.first_window}")
    from tqdm import tqdm

    bar = tqdm(total=args.n, desc="eval stage2 (held-out identities)", disable=args.quiet or None, file=sys.stderr)
    report, pics = evaluate_stage2(pipe, n=args.n, steps=steps, guidance=args.guidance, seed=args.seed,
                                   on_clip=lambda i, m: (bar.update(1), bar.set_postfix(psnr=f"{m['psnr']:.1f}")),
                                   keep=args.pictures, frames=args.frames, first_window=args.first_window)
    bar.close()
    report.update({"weights": str(getattr(pipe, "path", args.weights)), "device": args.device,
                   "sampler": type(pipe.sampler).__name__, "student": pipe.is_student, "decoder": pipe.decoder_kind,
                   "torch_threads": torch.get_num_threads(),
                   "command": "mvportrait " + " ".join(sys.argv[1:]) if sys.argv else None})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
    picture = picture if pics else None  # keep=0 clips: nothing to draw
    if picture:
        write_image(picture, comparison_sheet(pics))
    for k in ("psnr", "ssim", "autoencoder_psnr", "autoencoder_ssim", "view_consistency", "view_consistency_gt",
              "flicker_ratio", "seconds_per_frame"):
        print(f"{k:>20}: {report[k]:.4f}")
    print(f"{'psnr per view':>20}: {report['psnr_per_view']}")
    print(f"wrote {out}" + (f" and {picture}" if picture else ""))
    return 0


def register(sub, train_sub, eval_sub) -> None:
    """Add the stage-2 subcommands to the parsers built by :func:`mvportrait.cli.build_parser`."""
    s = train_sub.add_parser("stage2", help="train the FLAME2Video reference model (stage 2), stage by stage")
    s.add_argument("--stage", default="all", help="autoencoder | spatial | temporal | view | all (default)")
    s.add_argument("--config", default="tiny", help="Stage2Config preset (default tiny)")
    s.add_argument("--out", required=True, help="run folder: checkpoints, loss logs, final/ model")
    s.add_argument("--init", help="model folder the first stage starts from (default OUT/final)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    s.add_argument("--steps", type=int, help="override the stage's step count")
    s.add_argument("--batch", help="batch size: one value, or one per stage run (e.g. 64,64,16,8 with --stage all)")
    s.add_argument("--lr", type=float, help="override the stage's peak learning rate")
    s.add_argument("--pool-size", type=int, help="training clips rendered up front")
    s.add_argument("--frame-stride", type=int, help="corpus frames between training frames (model fps = 25/stride)")
    s.add_argument("--checkpoint-every", type=int)
    s.add_argument("--time-budget", help="seconds per stage (one value or one per stage run): lowers the step "
                                         "count to fit the measured step rate")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_train_stage2)

    s = sub.add_parser("generate", help="text (or a FLAME sequence) + reference portrait -> multi-view video")
    s.add_argument("--prompt", help='e.g. "turns left then smiles" (split into motion and emotion parts)')
    s.add_argument("--motion", help="motion text (overrides the prompt's motion part)")
    s.add_argument("--emotion", help="emotion text (overrides the prompt's emotion part)")
    s.add_argument("--flame", help="drive with a FLAME sequence .npz instead of text")
    s.add_argument("--reference", help="reference portrait (any image PIL reads; centre-cropped to a square and "
                                       "resized); default: the shipped synthetic portrait")
    s.add_argument("--views", default="ring-4", help="view rig: front, ring-N, arc-N, yaws:0,45,-45 (default ring-4)")
    s.add_argument("--seconds", type=float, default=4.0, help="length of the text-driven sequence (default 4)")
    s.add_argument("--steps", type=int, help="stage-2 sampling steps (default: 25 DDIM steps for the teacher, "
                                             "the student's default_steps (1) for a student)")
    s.add_argument("--stage1-steps", type=int, help="stage-1 sampling steps (default: 50 for the teachers, "
                                                    "2 for the students)")
    s.add_argument("--student", action="store_true", help="use the distilled consistency students of both stages "
                                                          "(few steps, guidance folded in; the default)")
    s.add_argument("--teacher", action="store_true", help="use the full-step teachers (25 + 50 DDIM steps with "
                                                          "guidance: slower, not better on the held-out sets)")
    s.add_argument("--guidance", type=float, help="image-guidance scale (default: the model's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--weights", help="stage-2 model folder (default: the shipped one)")
    s.add_argument("--stage1-weights", help="stage-1 weights folder (default: the shipped one)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--backend", help="torch | compile | onnxruntime | tensorrt, or per stage: "
                                      "stage1=torch,stage2=onnxruntime (default: MVP_BACKEND, else torch)")
    s.add_argument("--dtype", default="auto", help=DTYPE_HELP + " (default auto)")
    s.add_argument("--decoder", default="full", help=DECODER_HELP)
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("--per-view", action="store_true", help="also write one video per view (OUT_view0.mp4, ...)")
    s.add_argument("--out", default="out.mp4", help="multi-view grid video (.mp4)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_generate)

    s = eval_sub.add_parser("stage2", help="PSNR/SSIM, view consistency, flicker on held-out identities")
    s.add_argument("--weights", help="stage-2 model folder, teacher or student (default: the shipped teacher)")
    s.add_argument("--student", action="store_true", help="evaluate the shipped distilled student "
                                                          "(or check that --weights is one)")
    s.add_argument("--n", type=int, default=8, help="held-out clips (default 8)")
    s.add_argument("--steps", type=int, help="sampling steps (default: 25 DDIM steps for the teacher, the "
                                             "student's default_steps for a student)")
    s.add_argument("--decoder", default="full", help=DECODER_HELP)
    s.add_argument("--frames", type=int, help="clip length in frames (default the model's window; longer clips "
                                              "run in overlapping windows, as generate and stream do; at most "
                                              "what a 100-frame corpus clip holds at the model's rate: 50 at "
                                              "12.5 fps)")
    s.add_argument("--first-window", type=int, help="frames of window 0 (overlap+1 .. window; default the "
                                                    "window, as generate; stream's default with one step is "
                                                    "overlap+1)")
    s.add_argument("--guidance", type=float)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="float32", help=DTYPE_HELP + " (default float32: the reported numbers)")
    s.add_argument("--threads", type=int)
    s.add_argument("--pictures", type=int, default=2, help="clips shown in the picture")
    s.add_argument("--picture", default="docs/stage2_eval.png", help="ground truth vs generated picture")
    s.add_argument("--out", default="benchmarks/results/stage2_eval.json")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_eval_stage2)
