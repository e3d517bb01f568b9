"""``mvportrait distill stage1 | stage2``: consistency distillation of the shipped teachers.

Registered by :mod:`mvportrait.cli` through :func:`register`; the recipe is
:mod:`mvportrait.train.distill`. ``--export-only`` writes the student of an existing run's
checkpoint (no training), e.g. to ship it into ``mvportrait/weights``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def _cli():
    from mvportrait import cli

    return cli


def _command() -> str | None:
    if sys.argv and sys.argv[0].endswith(("mvportrait", "__main__.py", "cli.py")):
        return "mvportrait " + " ".join(sys.argv[1:])
    return None


def _common(args) -> dict:
    """Checked recipe overrides shared by both stages; sets the torch thread count."""
    from mvportrait.train.distill import LOSSES

    cli = _cli()
    over = {}
    over.update(cli.int_options(args, ("steps", "batch", "checkpoint_every", "default_steps")))
    if (w := cli.int_options(args, ("warmup_steps",), minimum=0)):
        over["warmup"] = w["warmup_steps"]
    if args.default_steps is not None and args.default_steps > 1000:
        raise cli.CliError(f"--default-steps must be in [1, 1000], got {args.default_steps}")
    if args.lr is not None:
        if not args.lr > 0:
            raise cli.CliError(f"--lr must be > 0, got {args.lr}")
        over["lr"] = args.lr
    if args.target_ema is not None:
        if not 0 <= args.target_ema < 1:
            raise cli.CliError(f"--target-ema must be in [0, 1), got {args.target_ema}")
        over["target_ema"] = args.target_ema
    if args.loss is not None:
        if args.loss not in LOSSES:
            raise cli.CliError(f"--loss must be one of {', '.join(LOSSES)}, got {args.loss!r}")
        over["loss"] = args.loss
    if args.guidance is not None:
        if not args.guidance >= 0:
            raise cli.CliError(f"--guidance must be >= 0, got {args.guidance}")
        over["guidance"] = args.guidance
    if args.seed < 0:
        raise cli.CliError(f"--seed must be >= 0, got {args.seed}")
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise cli.CliError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise cli.CliError(f"--device {args.device}: CUDA is not available on this machine")
    if args.device not in ("cpu",) and not args.device.startswith("cuda"):
        raise cli.CliError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    return over


def _budgets(text: str | None, names: tuple[str, ...]) -> dict[str, float] | None:
    """'600' -> the same budget for every model; '900,300' -> one per model, in order."""
    return None if text is None else _cli().per_item_values("time-budget", text, names, float, what="model")


def cmd_distill_stage1(args) -> int:
    from mvportrait.engine.text2flame import DEFAULT_WEIGHTS
    from mvportrait.train.distill import SUBSETS, distill_stage1, export_stage1_checkpoint

    cli = _cli()
    kinds = {"both": ("motion", "emotion"), "motion": ("motion",), "emotion": ("emotion",)}.get(args.kind)
    if kinds is None:
        raise cli.CliError(f"--kind must be motion, emotion or both, got {args.kind!r}")
    over = _common(args)
    over.update(cli.int_options(args, ("corpus_size", "captions_per_clip")))
    if args.velocity_weight is not None:
        if not args.velocity_weight >= 0:
            raise cli.CliError(f"--velocity-weight must be >= 0, got {args.velocity_weight}")
        over["velocity_weight"] = args.velocity_weight
    if args.subset is not None:
        if args.subset not in SUBSETS:
            raise cli.CliError(f"--subset must be one of {', '.join(SUBSETS)}, got {args.subset!r}")
        over["subset"] = args.subset
    teacher = Path(args.teacher) if args.teacher else DEFAULT_WEIGHTS
    for k in kinds:
        if not teacher.joinpath(f"{k}.json").is_file():
            raise cli.CliError(f"no {k} teacher at {teacher / k}.json")
    if args.text_model and not Path(args.text_model).expanduser().is_dir():
        raise cli.CliError(f"--text-model must be a local model folder, {args.text_model} is not a folder")
    budget = _budgets(args.time_budget, kinds)
    export = Path(args.export) if args.export else Path(args.out) / "final"
    if args.export_only:
        for k in kinds:
            w, _ = export_stage1_checkpoint(Path(args.out) / k, export / f"{k}_student", teacher / k,
                                            command=_command())
            print(f"{k}: exported {w} ({w.stat().st_size / 1024:.0f} KiB) from {Path(args.out) / k}")
        return 0
    t0 = time.perf_counter()
    summary = distill_stage1(args.out, kinds=kinds, teacher_dir=teacher, export_dir=export, text_model=args.text_model,
                             cache_dir=args.cache, device=args.device, seed=args.seed, resume=args.resume,
                             overrides=over, time_budget_s=budget, on_phase=cli._bar_phase(args.quiet),
                             command=_command())
    for kind, m in summary["models"].items():
        loss = (m["final_loss"] or {}).get("loss")
        print(f"{kind}: {m['steps']} steps in {m['wall_s']:.0f} s ({m['stopped_by']}), final loss {loss}, "
              f"-> {m['weights']} ({m['bytes'] / 1024:.0f} KiB)")
    print(f"distilled stage 1 in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_distill_stage2(args) -> int:
    from mvportrait.engine.flame2video import DEFAULT_WEIGHTS
    from mvportrait.train.distill import distill_stage2, export_stage2_checkpoint

    cli = _cli()
    over = _common(args)
    over.update(cli.int_options(args, ("views", "frames", "pool_size")))
    teacher = Path(args.teacher) if args.teacher else DEFAULT_WEIGHTS
    if not (teacher / "config.json").is_file():
        raise cli.CliError(f"no stage-2 teacher at {teacher} (config.json missing)")
    budget = _budgets(args.time_budget, ("stage2",))
    export = Path(args.export) if args.export else Path(args.out) / "student"
    if args.export_only:
        out = export_stage2_checkpoint(Path(args.out) / "unet", export, teacher, command=_command())
        print(f"exported {out} from {Path(args.out) / 'unet'}")
        return 0
    t0 = time.perf_counter()
    res = distill_stage2(args.out, teacher_dir=teacher, export_dir=export, device=args.device, seed=args.seed,
                         resume=args.resume, overrides=over, time_budget_s=budget["stage2"] if budget else None,
                         on_phase=cli._bar_phase(args.quiet), command=_command())
    loss = (res["final_loss"] or {}).get("loss")
    print(f"stage 2: {res['steps']} steps in {res['wall_s']:.0f} s ({res['stopped_by']}; data {res['data_s']:.0f} s), "
          f"final loss {loss} -> {res['export']} (total {time.perf_counter() - t0:.0f} s)")
    return 0


def _add_common(s) -> None:
    s.add_argument("--out", required=True, help="run folder (checkpoints, loss.jsonl)")
    s.add_argument("--teacher", help="teacher weights (default: the shipped ones)")
    s.add_argument("--export", help="where the student is written (default: inside --out)")
    s.add_argument("--export-only", action="store_true", help="write the student of the run's checkpoint, no training")
    s.add_argument("--steps", type=int, help="distillation steps (default: the recipe's)")
    s.add_argument("--batch", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--warmup-steps", type=int)
    s.add_argument("--target-ema", type=float, help="EMA decay of the target network (default 0.95, as LCM)")
    s.add_argument("--loss", help="l2 (default) or huber (pseudo-Huber)")
    s.add_argument("--guidance", type=float, help="teacher guidance folded into the student (default: the teacher's)")
    s.add_argument("--default-steps", type=int, help="sampling steps the pipelines default to for the student (2)")
    s.add_argument("--time-budget", help="seconds; the run stops cleanly (checkpoint + student) within it")
    s.add_argument("--checkpoint-every", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    """Add ``distill stage1`` and ``distill stage2`` to the top-level subparsers."""
    ds = sub.add_parser("distill", help="consistency-distil the teachers into few-step students")
    dsub = ds.add_subparsers(dest="distill_command", metavar="STAGE", required=True)
    s = dsub.add_parser("stage1", help="MotionDM / EmotionDM students (1-4 step consistency sampling)")
    _add_common(s)
    s.add_argument("--kind", default="both", help="motion, emotion or both (default)")
    s.add_argument("--corpus-size", type=int)
    s.add_argument("--captions-per-clip", type=int)
    s.add_argument("--velocity-weight", type=float, help="weight of the frame-difference term (default 0.5)")
    s.add_argument("--subset", help="trained tensors: all, or no-ff (feed-forward layers kept from the teacher)")
    s.add_argument("--text-model", help="local MiniLM folder (default: the package / MVP_TEXT_MODEL)")
    s.add_argument("--cache", help="folder to cache encoded captions")
    s.set_defaults(func=cmd_distill_stage1)
    s = dsub.add_parser("stage2", help="FLAME2Video denoising-UNet student (1-4 step consistency sampling)")
    _add_common(s)
    s.add_argument("--views", type=int, help="views per training clip (default 2)")
    s.add_argument("--frames", type=int, help="frames per training clip (default 4)")
    s.add_argument("--pool-size", type=int, help="training clips rendered and encoded once (default 96)")
    s.set_defaults(func=cmd_distill_stage2)
