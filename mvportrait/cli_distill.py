"""``mvportrait distill stage1 | stage2 | decoder`` and ``mvportrait eval decoder``.

``stage1`` / ``stage2``: consistency distillation of the shipped teachers (the recipe is
:mod:`mvportrait.train.distill`); ``decoder``: a tiny latent decoder distilled from the stage-2
autoencoder (:mod:`mvportrait.train.tiny_decoder`), evaluated by ``eval decoder``. Registered by
:mod:`mvportrait.cli` through :func:`register`. ``--export-only`` writes the student (or tiny
decoder) of an existing run's checkpoint (no training), e.g. to ship it into ``mvportrait/weights``.
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


def _threads(args) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise _cli().CliError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def cmd_distill_decoder(args) -> int:
    from mvportrait.train.tiny_decoder import _default_teacher, distill_decoder, export_checkpoint

    cli = _cli()
    over = cli.int_options(args, ("steps", "batch", "checkpoint_every", "pool_size", "frames"))
    over.update(cli.int_options(args, ("crop",), minimum=0))
    if args.lr is not None:
        if not args.lr > 0:
            raise cli.CliError(f"--lr must be > 0, got {args.lr}")
        over["lr"] = args.lr
    if args.seed < 0:
        raise cli.CliError(f"--seed must be >= 0, got {args.seed}")
    budget = None
    if args.time_budget is not None:
        try:
            budget = float(args.time_budget)
        except ValueError:
            raise cli.CliError(f"--time-budget must be a number of seconds, got {args.time_budget!r}") from None
        if not budget > 0:
            raise cli.CliError(f"--time-budget must be > 0, got {args.time_budget}")
    _threads(args)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise cli.CliError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    export = Path(args.export) if args.export else Path(args.out) / "tiny_decoder"
    if args.export_only:
        out = export_checkpoint(args.out, export, command=_command())
        print(f"exported {out} from {args.out}")
        return 0
    teacher = Path(args.teacher) if args.teacher else _default_teacher()
    if not (teacher / "config.json").is_file():
        raise cli.CliError(f"no stage-2 teacher at {teacher} (config.json missing)")
    res = distill_decoder(args.out, teacher_dir=teacher, export_dir=export, device=args.device, seed=args.seed,
                          resume=args.resume, overrides=over, time_budget_s=budget,
                          on_phase=cli._bar_phase(args.quiet), command=_command())
    loss = (res["final_loss"] or {}).get("loss")
    print(f"tiny decoder: {res['steps']} steps in {res['wall_s']:.0f} s ({res['stopped_by']}; "
          f"data {res['data_s']:.0f} s, {res['pool_images']} images), final loss {loss} -> {res['export']}")
    return 0


def cmd_eval_decoder(args) -> int:
    import json

    from mvportrait.fileio import atomic_write
    from mvportrait.models.tiny_decoder import DEFAULT_WEIGHTS
    from mvportrait.train.tiny_decoder import evaluate_weights

    cli = _cli()
    cli.int_options(args, ("n",))
    if args.seed < 0:
        raise cli.CliError(f"--seed must be >= 0, got {args.seed}")
    _threads(args)
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".json":
        raise cli.CliError(f"--out must be a .json file, got {out}")
    rep = evaluate_weights(args.weights or DEFAULT_WEIGHTS, teacher_dir=args.teacher, n=args.n, seed=args.seed,
                           timing=not args.no_timing)
    for k in ("tiny_vs_gt", "full_vs_gt", "tiny_vs_full"):
        r = rep[k]
        print(f"{k:13s} PSNR {r['psnr']:.2f} dB (std {r['psnr_std']:.2f})  SSIM {r['ssim']:.4f}")
    for dt in ("float32", "bfloat16"):
        if dt in rep.get("timing", {}):
            t = rep["timing"][dt]
            print(f"decode {rep['timing']['batch']} x {rep['image_size']}px {dt:8s} "
                  f"({rep['timing']['threads']} threads): full {t['full']['p50']:.1f} ms, "
                  f"tiny {t['tiny']['p50']:.1f} ms ({t['speedup_p50']:.1f}x)")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(rep, indent=1) + "\n"))
        print(f"wrote {out}")
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


def register(sub, eval_sub=None) -> None:
    """Add ``distill stage1 | stage2 | decoder`` to the top-level subparsers and ``decoder`` to ``eval``'s."""
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
    s = dsub.add_parser("decoder", help="tiny latent decoder distilled from the stage-2 autoencoder (TAESD-style)")
    s.add_argument("--out", required=True, help="run folder (pool cache, checkpoints, loss.jsonl)")
    s.add_argument("--teacher", help="stage-2 teacher folder (default: the shipped mvportrait/weights/stage2)")
    s.add_argument("--export", help="where tiny_decoder.safetensors/.json are written (default: OUT/tiny_decoder)")
    s.add_argument("--export-only", action="store_true", help="write the decoder of the run's checkpoint, no training")
    s.add_argument("--steps", type=int, help="training steps (default 20000; --time-budget usually ends sooner)")
    s.add_argument("--batch", type=int, help="crops per step (default 32)")
    s.add_argument("--crop", type=int, help="latent crop side (default 16; 0 = whole latents)")
    s.add_argument("--lr", type=float, help="peak AdamW learning rate (default 1e-3)")
    s.add_argument("--pool-size", type=int, help="training clips rendered once (default 256)")
    s.add_argument("--frames", type=int, help="frames per training clip (default 2)")
    s.add_argument("--time-budget", help="seconds for the whole run, data included")
    s.add_argument("--checkpoint-every", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint and pool cache in --out (options not given: the run's own; "
                        "a larger --steps continues a finished run)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_distill_decoder)
    if eval_sub is not None:
        s = eval_sub.add_parser("decoder", help="tiny vs full decoder: PSNR/SSIM on held-out frames, decode time")
        s.add_argument("--weights", help="tiny-decoder folder (default: mvportrait/weights/stage2_student)")
        s.add_argument("--teacher", help="stage-2 folder whose autoencoder is compared (default: the shipped)")
        s.add_argument("--n", type=int, default=64, help="held-out frames (x the model's views)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, help="torch CPU threads (timings use them)")
        s.add_argument("--no-timing", action="store_true", help="skip the decode timings")
        s.add_argument("--out", help="write the report as JSON")
        s.set_defaults(func=cmd_eval_decoder)
