"""``mvportrait export onnx`` and ``mvportrait export tensorrt``: the export layer on the command line.

``export onnx --model tiny|sd15|PATH --out DIR`` writes ``DIR/<network>/model.onnx`` (plus
``model.onnx.data`` for graphs over 2 GB) for every network, each checked (onnx.checker, strict shape
inference) and compared with PyTorch in ONNX Runtime on fresh random inputs at two or more shapes of
its dynamic range; ``DIR/report.json`` holds per network the file sizes, export time, inferred output
shapes and the parity numbers (max abs / relative error per output and shape). Exit status 1 when a
parity check fails.

Models: ``tiny`` (the shipped stage-2 weights when present, else the preset with random weights),
``sd15`` (the preset, random weights: the graph and its parity, not a trained model), or a stage-2
checkpoint folder. Stage 1 (MotionDM, EmotionDM, and the MiniLM text encoder when its package is
installed) comes from ``--stage1`` (default: the shipped weights; ``none`` skips it).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _cli():
    from mvportrait import cli

    return cli


# stage-2 components each exported network reads (``--low-memory`` frees the rest, and each after its last use)
_NEEDS = {"vae_encoder": ("autoencoder",), "vae_decoder": ("autoencoder",), "flame_encoder": ("flame_encoder",),
          "reference": ("image_embedder", "reference_unet", "unet"), "unet": ("unet",)}


def _parse_dims(items, cli) -> dict[tuple[str | None, str], tuple[int, int, int]]:
    """``[NET.]DIM=MIN:OPT:MAX`` -> {(net or None, dim): (min, opt, max)}."""
    out = {}
    for item in items or []:
        name, _, rng = item.partition("=")
        net, _, dim = name.rpartition(".")
        try:
            lo, opt, hi = (int(x) for x in rng.split(":"))
        except ValueError:
            raise cli.CliError(f"--dim {item!r}: expected [NETWORK.]DIM=MIN:OPT:MAX, e.g. unet.h=8:16:32") from None
        out[(net or None, dim.strip())] = (lo, opt, hi)
    return out


def _load_stage2(model: str, image_size: int | None):
    import torch

    from mvportrait.config import STAGE2_PRESETS, Stage2Config
    from mvportrait.engine.flame2video import DEFAULT_WEIGHTS
    from mvportrait.models.stage2 import FLAME2VideoModel

    if model in STAGE2_PRESETS:
        if model == "tiny" and (DEFAULT_WEIGHTS / "config.json").is_file() and image_size is None:
            return FLAME2VideoModel.from_pretrained(DEFAULT_WEIGHTS), f"tiny (shipped weights {DEFAULT_WEIGHTS})"
        cfg = Stage2Config.from_name(model, **({"image_size": image_size} if image_size else {}))
        torch.manual_seed(0)
        m = FLAME2VideoModel(cfg).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # zero-initialised output layers would make their graphs' parity trivial
            for p in m.parameters():
                if p.dim() > 1 and not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return m, f"{model} preset, random weights (zero-initialised layers filled with N(0, 0.02))"
    path = Path(model)
    if not path.is_dir():
        raise _cli().CliError(f"--model must be one of {', '.join(STAGE2_PRESETS)} or a stage-2 checkpoint "
                              f"folder; {path} is neither")
    if image_size:
        raise _cli().CliError("--image-size applies to presets only; a checkpoint has its own image size")
    return FLAME2VideoModel.from_pretrained(path), f"checkpoint {path}"


def _stage1_specs(arg: str | None):
    """Stage-1 specs (and a note) for --stage1."""
    from mvportrait.engine.text2flame import DEFAULT_WEIGHTS, _load
    from mvportrait.export.spec import stage1_specs

    if arg == "none":
        return {}, "stage 1 skipped (--stage1 none)"
    folder = Path(arg) if arg else DEFAULT_WEIGHTS
    if not (folder / "motion.json").is_file():
        if arg:
            raise _cli().CliError(f"--stage1 {folder}: no stage-1 weights (motion.json) there")
        return {}, f"stage 1 skipped: no weights in {folder}"
    motion, meta = _load(folder / "motion")
    emotion, _ = _load(folder / "emotion")
    net, note = None, f"stage 1 from {folder}"
    try:
        from mvportrait.models.text_encoder import open_text_encoder

        enc = open_text_encoder(meta.get("text_encoder", "minilm"))
        net = getattr(enc, "net", None)
        max_tokens = enc.max_tokens
    except (ImportError, FileNotFoundError) as e:
        note += f"; text encoder skipped ({str(e).splitlines()[0]})"
        max_tokens = 256
    return stage1_specs(motion, emotion, net, max_tokens=max_tokens), note


def cmd_export_onnx(args) -> int:
    import torch

    from mvportrait.export import onnx as ox
    from mvportrait.export.spec import stage2_specs
    from mvportrait.fileio import atomic_write

    cli = _cli()
    if args.opset not in ox.SUPPORTED_OPSETS:
        raise cli.CliError(f"--opset must be one of {ox.SUPPORTED_OPSETS}, got {args.opset}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = _parse_dims(args.dim, cli)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, model_note = _load_stage2(args.model, args.image_size)
    specs = stage2_specs(model, views=args.views, frames=args.frames)
    s1_specs, s1_note = _stage1_specs(args.stage1)
    specs.update(s1_specs)
    wanted = args.networks.split(",") if args.networks else list(specs)
    unknown = [n for n in wanted if n not in specs]
    if unknown:
        raise cli.CliError(f"--networks: unknown {unknown}; this model has {', '.join(specs)}")
    if args.low_memory:  # components no wanted network reads: freed now
        for comp in {c for cs in _NEEDS.values() for c in cs} - {c for n in wanted for c in _NEEDS.get(n, ())}:
            getattr(model, comp).to("meta")
    report = {"model": model_note, "stage1": s1_note, "opset": args.opset, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "networks": {}, "passed": True,
              "command": "mvportrait " + " ".join(sys.argv[1:]) if sys.argv else None}
    for i, name in enumerate(wanted):
        spec = specs[name]
        for (net, dim), rng in dims.items():
            if net in (None, name) and dim in {d.name for d in spec.dims}:
                try:
                    spec = spec.with_dims(**{dim: rng})
                except ValueError as e:
                    raise cli.CliError(f"--dim {dim}: {e}") from None
        folder = out / name
        folder.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        path = ox.export_onnx(spec, folder / ox.MODEL_FILE, opset=args.opset,
                              external_data=True if args.external_data == "always" else None, check=False)
        export_s = time.perf_counter() - t0
        inferred = ox.check_onnx(spec, path)
        entry = {"file": str(path), "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
                 "external_data": (folder / (ox.MODEL_FILE + ".data")).is_file(), "export_s": round(export_s, 2),
                 "inferred_outputs": inferred, "spec": spec.to_dict()}
        (folder / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
        line = f"{name:>14}: {entry['bytes'] / 2 ** 20:9.1f} MiB, exported + checked in {export_s:.1f} s"
        if not args.no_parity:
            release = None
            if args.low_memory:
                later = {c for n in wanted[i + 1:] for c in _NEEDS.get(n, ())}
                mods = [getattr(model, c) for c in _NEEDS.get(name, ()) if c not in later] if name in _NEEDS \
                    else [spec.module]
                release = lambda mods=mods: [m.to("meta") for m in mods]  # noqa: E731
            par = ox.check_parity(spec, path, seed=args.seed, atol=args.atol, rtol=args.rtol, release=release,
                                  low_memory=args.low_memory)
            entry["parity"] = par
            report["passed"] &= par["passed"]
            worst = max((o.get("max_abs", float("inf")), o.get("max_rel", float("inf")))
                        for p in par["points"] for o in p["outputs"].values())
            line += (f"; parity at {len(par['points'])} shapes: max abs {worst[0]:.2e}, max rel {worst[1]:.2e} "
                     f"{'ok' if par['passed'] else 'FAILED'}")
        report["networks"][name] = entry
        print(line, flush=True)
        atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
    print(s1_note)
    print(f"wrote {len(wanted)} networks and {out / 'report.json'} ({model_note})")
    return 0 if report["passed"] else 1


def cmd_export_tensorrt(args) -> int:
    from mvportrait.export.cache import ArtifactCache
    from mvportrait.export.onnx import cached_onnx
    from mvportrait.export.spec import stage2_specs
    from mvportrait.export.tensorrt import BuildOptions, cached_engine, require_tensorrt

    cli = _cli()
    try:
        require_tensorrt()
    except ImportError as e:
        raise cli.CliError(str(e)) from None
    import torch

    if not torch.cuda.is_available():
        raise cli.CliError("TensorRT engines are built on an NVIDIA GPU; CUDA is not available here")
    model, note = _load_stage2(args.model, args.image_size)
    specs = stage2_specs(model.cuda(), views=args.views, frames=args.frames)
    specs.update(_stage1_specs(args.stage1)[0])
    cache = ArtifactCache(args.cache) if args.cache else ArtifactCache()
    wanted = args.networks.split(",") if args.networks else list(specs)
    for name in wanted:
        if name not in specs:
            raise cli.CliError(f"--networks: unknown {name!r}; this model has {', '.join(specs)}")
        t0 = time.perf_counter()
        onnx_path = cached_onnx(specs[name], cache)
        engine = cached_engine(specs[name], onnx_path, cache=cache,
                               options=BuildOptions(precision=args.precision, workspace_gb=args.workspace_gb))
        print(f"{name:>14}: {engine} ({time.perf_counter() - t0:.0f} s)")
    print(f"engines for {note} in {cache.root}")
    return 0


def register(sub) -> None:
    """Add ``export onnx`` / ``export tensorrt`` to the parser built by :func:`mvportrait.cli.build_parser`."""
    ex = sub.add_parser("export", help="export the networks: ONNX (checked, parity-tested) or TensorRT engines")
    ex = ex.add_subparsers(dest="export_command", metavar="FORMAT")
    ex.required = True

    def common(s):
        s.add_argument("--model", default="tiny", help="tiny (default), sd15, or a stage-2 checkpoint folder")
        s.add_argument("--stage1", help="stage-1 weights folder (default: the shipped ones); 'none' skips stage 1")
        s.add_argument("--networks", help="comma-separated subset, e.g. unet,vae_decoder (default: all)")
        s.add_argument("--image-size", type=int, help="preset image size override (smaller = lighter export)")
        s.add_argument("--views", type=int, help="opt views of the stage-2 specs (default: the config's)")
        s.add_argument("--frames", type=int, help="opt frames of the stage-2 specs (default: the config's)")

    s = ex.add_parser("onnx", help="export every network to ONNX, check it and compare it with PyTorch")
    common(s)
    s.add_argument("--out", required=True, help="output folder: <network>/model.onnx + report.json")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset, 17-20 (default 17)")
    s.add_argument("--dim", action="append", help="[NETWORK.]DIM=MIN:OPT:MAX dynamic range override (repeatable)")
    s.add_argument("--external-data", choices=("auto", "always"), default="auto",
                   help="weights in a .onnx.data file: only past 2 GB (auto) or always")
    s.add_argument("--no-parity", action="store_true", help="skip the ONNX Runtime parity check")
    s.add_argument("--seed", type=int, help="parity input seed (default: fresh, recorded in the report)")
    s.add_argument("--atol", type=float, default=1e-4)
    s.add_argument("--rtol", type=float, default=1e-4, help="tolerance relative to the output's max |value|")
    s.add_argument("--threads", type=int, help="torch / ONNX Runtime CPU threads")
    s.add_argument("--low-memory", action="store_true",
                   help="free each network's torch weights once its parity references are computed (multi-GB "
                        "models: never two copies of the weights in memory)")
    s.set_defaults(func=cmd_export_onnx)

    s = ex.add_parser("tensorrt", help="build TensorRT 10 engines into the artifact cache (NVIDIA GPU + TensorRT)")
    common(s)
    s.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")
    s.add_argument("--workspace-gb", type=float, default=8.0)
    s.add_argument("--cache", help="artifact cache folder (default MVP_CACHE_DIR)")
    s.set_defaults(func=cmd_export_tensorrt)
