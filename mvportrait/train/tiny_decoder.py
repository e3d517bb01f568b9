"""Distillation of a stage-2 teacher's autoencoder decoder into a :class:`TinyDecoder`, and its evaluation.

Data: ``pool_size`` clips of the multi-view corpus training split (:class:`ClipPool`, the stage-2
training data path; ``views`` x ``frames`` per clip), rendered once. For every image ``x`` the pool
holds the teacher's latents ``z = autoencoder.encode(x)`` (posterior mean, scaled: what the UNet and
the pipeline's decoder see) and the teacher's decoding ``y = autoencoder.decode(z)``, all computed
once in float32 and cached in ``OUT/pool.safetensors`` (a resumed run reuses it).

Loss, on random ``crop`` x ``crop`` latent crops (the decoder is fully convolutional; crops make a
step ~4x cheaper than whole 32x32 latents at the same image count)::

    loss = gt_weight * L1(tiny(z), x) + teacher_weight * L1(tiny(z), y)        (both weights 1)

the ground-truth term keeps the tiny decoder from copying the teacher's blur, the teacher term
gives it the teacher's look where the latents are ambiguous. ``tiny(z)`` is the unclamped output.
AdamW, linear warm-up then cosine decay to 0 at ``steps``; ``time_budget_s`` (data included) refits
``steps`` to the budget from the measured step rate (the schedule follows). Every draw of step
``k`` comes from a generator seeded with (seed, k), so a resumed run repeats the uninterrupted one;
a resumed run takes its recipe from the checkpoint (overrides win), and a larger ``steps`` continues
a finished run on the cosine stretched to the new count (the learning rate rises back part-way).
Checkpoints (``OUT/checkpoint.safetensors`` + ``checkpoint.json``: weights, AdamW state, step)
every ``checkpoint_every`` steps and at the end; losses in ``OUT/loss.jsonl``; the export is
``TinyDecoder.save_pretrained(export, float16)``.

    mvportrait distill decoder --out /work/runs/tiny_decoder --time-budget 2100 --export DIR
    mvportrait eval decoder --weights DIR --n 64 --out eval.json
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from mvportrait.config import check_ints, check_numbers, replace_known
from mvportrait.fileio import atomic_write
from mvportrait.models.tiny_decoder import TinyDecoder, TinyDecoderConfig
from mvportrait.train.common import StepBudget, enable_tf32, load_optimizer, optimizer_step, optimizer_tensors

log = logging.getLogger(__name__)

__all__ = ["TinyDecoderTrainConfig", "DecoderPool", "train_tiny_decoder", "distill_decoder", "export_checkpoint",
           "evaluate_decoder", "time_decoder"]


@dataclass(frozen=True)
class TinyDecoderTrainConfig:
    """Hyper-parameters of a tiny-decoder distillation run (see the module docstring)."""

    steps: int = 20000
    batch: int = 32
    crop: int = 16  # latent crop side; 0 = whole latents
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    gt_weight: float = 1.0
    teacher_weight: float = 1.0
    log_every: int = 25
    checkpoint_every: int = 250
    pool_size: int = 256
    pool_seed: int = 0
    views: int = 4
    frames: int = 2
    frame_stride: int = 4
    channels: tuple[int, ...] = (64, 32, 16)
    blocks: tuple[int, ...] = (2, 1, 1)

    def __post_init__(self):
        check_ints(self, ("steps", "batch", "log_every", "checkpoint_every", "pool_size", "views", "frames",
                          "frame_stride"))
        check_ints(self, ("warmup", "pool_seed", "crop"), minimum=0)
        check_numbers(self, ("lr", "weight_decay", "grad_clip", "gt_weight", "teacher_weight"))
        if not self.lr > 0:
            raise ValueError(f"TinyDecoderTrainConfig.lr must be > 0, got {self.lr}")
        if not self.gt_weight + self.teacher_weight > 0:
            raise ValueError("TinyDecoderTrainConfig: gt_weight + teacher_weight must be > 0")
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "blocks", tuple(self.blocks))

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "TinyDecoderTrainConfig":
        return replace_known(self, **kw)


# ------------------------------------------------------------------------------------- data
class DecoderPool:
    """``images`` (N, 3, H, W) uint8, ``latents`` (N, z, h, w) float32 (scaled, as ``encode`` returns),
    ``teacher`` (N, 3, H, W) float16 (the teacher's ``decode(latents)``)."""

    def __init__(self, images: torch.Tensor, latents: torch.Tensor, teacher: torch.Tensor):
        if not (images.shape[0] == latents.shape[0] == teacher.shape[0]) or images.shape != teacher.shape:
            raise ValueError(f"pool tensors disagree: images {tuple(images.shape)}, latents {tuple(latents.shape)}, "
                             f"teacher {tuple(teacher.shape)}")
        self.images, self.latents, self.teacher = images, latents, teacher

    @property
    def size(self) -> int:
        return self.images.shape[0]

    @classmethod
    @torch.no_grad()
    def from_images(cls, images: torch.Tensor, autoencoder, chunk: int = 32,
                    on_progress: Callable[[int], None] | None = None) -> "DecoderPool":
        """Encode (posterior mean) and decode uint8 images (N, 3, H, W) with the teacher autoencoder."""
        lat, dec = [], []
        for s in range(0, images.shape[0], chunk):
            x = images[s:s + chunk].float() / 127.5 - 1.0
            z = autoencoder.encode(x)
            lat.append(z.float())
            dec.append(autoencoder.decode(z).clamp(-1, 1).to(torch.float16))
            if on_progress:
                on_progress(x.shape[0])
        return cls(images, torch.cat(lat), torch.cat(dec))

    def save(self, path: Path, meta: dict) -> None:
        tensors = {"images": self.images.contiguous(), "latents": self.latents.contiguous(),
                   "teacher": self.teacher.contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"key": json.dumps(meta, sort_keys=True)}))

    @classmethod
    def load(cls, path: Path, meta: dict) -> "DecoderPool | None":
        """The cached pool at ``path`` if it was built with ``meta``, else None."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                if f.metadata().get("key") != json.dumps(meta, sort_keys=True):
                    return None
            t = load_file(str(path))
            return cls(t["images"], t["latents"], t["teacher"])
        except Exception as e:  # noqa: BLE001 - a bad cache is rebuilt
            log.warning("pool cache %s unusable (%s); rebuilding", path, e)
            return None


def render_images(split: str, n: int, seed: int, *, image_size: int, views: int, frames: int, frame_stride: int,
                  device="cpu", chunk: int = 8, on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``n`` corpus clips of ``split`` as uint8 images (n * views * frames, 3, H, W), clip-major."""
    from mvportrait.data.multiview import MultiViewCorpus
    from mvportrait.train.stage2 import ClipPool

    corpus = MultiViewCorpus(split=split, seed=seed, image_size=image_size, views=views, frames=frames,
                             frame_stride=frame_stride, device=device)
    out = []
    for s in range(0, n, chunk):
        b = corpus.batch(list(range(s, min(n, s + chunk))))
        out.append(ClipPool.to_uint8(b["target"]).flatten(0, 2))
        if on_progress:
            on_progress(min(n, s + chunk) - s)
    return torch.cat(out)


# ----------------------------------------------------------------------------------- train
def lr_at(step: int, tc: TinyDecoderTrainConfig) -> float:
    """Linear warm-up over ``min(warmup, steps // 10)`` steps, then cosine decay to 0 at ``steps``."""
    warmup = min(tc.warmup, tc.steps // 10)
    if step < warmup:
        return tc.lr * (step + 1) / max(1, warmup)
    p = (step - warmup) / max(1, tc.steps - warmup)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _batch(pool: DecoderPool, g: torch.Generator, tc: TinyDecoderTrainConfig, factor: int):
    """(latents (B, z, c, c), images (B, 3, cf, cf), teacher (B, 3, cf, cf)) float32 crops."""
    idx = torch.randint(0, pool.size, (tc.batch,), generator=g)
    h, w = pool.latents.shape[-2:]
    c = min(tc.crop or max(h, w), h, w)
    ys = torch.randint(0, h - c + 1, (tc.batch,), generator=g).tolist()
    xs = torch.randint(0, w - c + 1, (tc.batch,), generator=g).tolist()
    lat, img, tea = [], [], []
    for i, y, x in zip(idx.tolist(), ys, xs):
        lat.append(pool.latents[i, :, y:y + c, x:x + c])
        sl = (slice(None), slice(y * factor, (y + c) * factor), slice(x * factor, (x + c) * factor))
        img.append(pool.images[i][sl])
        tea.append(pool.teacher[i][sl])
    return (torch.stack(lat).float(), torch.stack(img).float() / 127.5 - 1.0, torch.stack(tea).float())


def train_tiny_decoder(decoder: TinyDecoder, pool: DecoderPool, tc: TinyDecoderTrainConfig, out_dir, *,
                       seed: int = 0, resume: bool = False, device="cpu", time_budget_s: float | None = None,
                       stop_at: int | None = None, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``decoder`` in place on ``pool``; returns {steps, start, wall_s, stopped_by, final_loss, config}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    ckpt, meta_path, log_path = out_dir / "checkpoint.safetensors", out_dir / "checkpoint.json", out_dir / "loss.jsonl"
    decoder.to(dev).train().requires_grad_(True)
    named = list(decoder.named_parameters())
    names, params = [n for n, _ in named], [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    start = 0
    if resume and ckpt.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if TinyDecoderConfig.from_dict(meta.get("config", {})) != decoder.config:
            raise ValueError(f"checkpoint {ckpt} belongs to another decoder config; use a new --out")
        tensors = load_file(str(ckpt), device=str(dev))
        with torch.no_grad():
            for n, p in named:
                p.copy_(tensors[f"model.{n}"])
        load_optimizer(opt, names, tensors)
        start = int(meta["step"])
        planned = int(meta.get("train", {}).get("steps", 0))
        if planned > start:  # an interrupted run: continue its learning-rate schedule
            tc = tc.replace(steps=planned)
        log.info("resumed tiny-decoder training at step %d", start)
    elif log_path.exists():
        log_path.unlink()

    def save_checkpoint(step: int) -> None:
        tensors = {f"model.{n}": p.detach().contiguous() for n, p in named}
        tensors.update({k: v.contiguous() for k, v in optimizer_tensors(opt, names).items()})
        atomic_write(ckpt, lambda tmp: save_file(tensors, tmp))
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(
            {"step": step, "seed": seed, "config": decoder.config.to_dict(), "train": tc.to_dict()}, indent=1)))

    factor = decoder.config.factor
    t0 = time.perf_counter()
    step, saved = start, start
    acc: dict[str, float] = {}
    count, stopped_by = 0, "steps"
    last_row = None
    budget = StepBudget(time_budget_s, start, tc.steps) if time_budget_s is not None else None
    while True:
        fit = budget.fit(step) if budget is not None else None  # refit the step count to the budget
        if fit is not None and fit != tc.steps:
            (log.info if step - start <= 25 else log.debug)(
                "%.3f s/step at step %d: %d steps fit the %.0f s budget", budget.rate, step, fit, time_budget_s)
            tc = tc.replace(steps=fit)
            stopped_by = "time budget"
        if budget is not None and budget.spent() and step > start:
            stopped_by = "time budget"
            break
        end = tc.steps if stop_at is None else min(stop_at, tc.steps)
        if step >= end:
            break
        g = torch.Generator().manual_seed((seed * 1_000_003 + 31 * 7_919 + step) % (2**63 - 1))
        lat, img, tea = (t.to(dev) for t in _batch(pool, g, tc, factor))
        out = decoder.decode_raw(lat)
        l_gt = (out - img).abs().mean()
        l_t = (out - tea).abs().mean()
        loss = tc.gt_weight * l_gt + tc.teacher_weight * l_t
        if not torch.isfinite(loss):
            raise FloatingPointError(f"tiny decoder: loss is {float(loss)} at step {step}")
        optimizer_step(opt, loss, params, lr_at(step, tc), tc.grad_clip)
        for k, v in (("loss", loss), ("l1_gt", l_gt), ("l1_teacher", l_t)):
            acc[k] = acc.get(k, 0.0) + float(v.detach())
        count += 1
        step += 1
        if step % tc.log_every == 0 or step == end:
            last_row = {"step": step, "lr": lr_at(step - 1, tc), **{k: v / count for k, v in acc.items()},
                        "elapsed_s": round(time.perf_counter() - t0, 2)}
            with open(log_path, "a") as f:
                f.write(json.dumps(last_row) + "\n")
            acc, count = {}, 0
        if on_step:
            on_step(step, {"loss": float(loss.detach())})
        if step % tc.checkpoint_every == 0:
            save_checkpoint(step)
            saved = step
    if count:
        last_row = {"step": step, "lr": lr_at(step - 1, tc), **{k: v / count for k, v in acc.items()},
                    "elapsed_s": round(time.perf_counter() - t0, 2)}
        with open(log_path, "a") as f:
            f.write(json.dumps(last_row) + "\n")
    if saved != step or not ckpt.is_file():
        save_checkpoint(step)
    decoder.eval().requires_grad_(False)
    return {"steps": step, "start": start, "wall_s": round(time.perf_counter() - t0, 1), "stopped_by": stopped_by,
            "final_loss": last_row, "train": tc.to_dict()}


def _load_teacher(teacher_dir, device):
    from mvportrait.models.stage2 import FLAME2VideoModel

    return FLAME2VideoModel.from_pretrained(teacher_dir, device=device, dtype=torch.float32)


def _default_teacher() -> Path:
    return Path(__file__).resolve().parents[1] / "weights" / "stage2"


def distill_decoder(out, *, teacher_dir=None, export_dir=None, device="cpu", seed: int = 0, resume: bool = False,
                    overrides: dict | None = None, time_budget_s: float | None = None,
                    on_phase: Callable[[str, int], Callable] | None = None, command: str | None = None,
                    teacher=None) -> dict:
    """Distil the teacher folder's decoder (default: the shipped stage-2 model) into ``export_dir``
    (default ``OUT/tiny_decoder``); ``teacher`` (a FLAME2VideoModel) replaces the folder (tests)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dev = torch.device(device)
    enable_tf32(dev)
    base = TinyDecoderTrainConfig()
    if resume and (out / "checkpoint.json").is_file():  # the run's own recipe (data, architecture) unless overridden
        saved = json.loads((out / "checkpoint.json").read_text()).get("train") or {}
        base = base.replace(**{k: v for k, v in saved.items() if k in TinyDecoderTrainConfig.__dataclass_fields__})
    tc = base.replace(**(overrides or {}))
    teacher_dir = Path(teacher_dir) if teacher_dir is not None else _default_teacher()
    model = teacher if teacher is not None else _load_teacher(teacher_dir, dev)
    ae = model.autoencoder.eval().requires_grad_(False)
    cfg = model.config
    if tc.views > cfg.views:  # a teacher with fewer views (the micro test models): all of them
        tc = tc.replace(views=cfg.views)
    key = {"teacher": str(teacher_dir) if teacher is None else "<in-memory>", "autoencoder": ae.cfg.to_dict(),
           "image_size": cfg.image_size, "pool_size": tc.pool_size, "pool_seed": tc.pool_seed, "views": tc.views,
           "frames": tc.frames, "frame_stride": tc.frame_stride}
    pool_path = out / "pool.safetensors"
    pool = DecoderPool.load(pool_path, key) if (resume and pool_path.is_file()) else None
    if resume and pool_path.is_file() and pool is None:
        log.warning("the pool cache %s was built with other data options; rendering a new pool", pool_path)
    if pool is None:
        upd = on_phase("render training clips", tc.pool_size) if on_phase else None
        images = render_images("train", tc.pool_size, tc.pool_seed, image_size=cfg.image_size, views=tc.views,
                               frames=tc.frames, frame_stride=tc.frame_stride, device=dev,
                               on_progress=(lambda k: upd(k, {})) if upd else None)
        upd = on_phase("encode + teacher-decode", images.shape[0]) if on_phase else None
        pool = DecoderPool.from_images(images, ae, on_progress=(lambda k: upd(k, {})) if upd else None)
        pool.save(pool_path, key)
    data_s = time.perf_counter() - t0
    dcfg = TinyDecoderConfig(latent_channels=ae.cfg.latent_channels, factor=ae.factor, channels=tc.channels,
                             blocks=tc.blocks)
    torch.manual_seed(seed)
    decoder = TinyDecoder(dcfg)
    upd = on_phase("distil tiny decoder", tc.steps) if on_phase else None
    last = {"step": None}

    def on_step(step, info):
        if upd:
            upd(step - (last["step"] if last["step"] is not None else step - 1), info)
        last["step"] = step

    res = train_tiny_decoder(decoder, pool, tc, out, seed=seed, resume=resume, device=dev, on_step=on_step,
                             time_budget_s=None if time_budget_s is None else max(1.0, time_budget_s - data_s))
    res["data_s"] = round(data_s, 1)
    res["pool_images"] = pool.size
    export_dir = Path(export_dir) if export_dir is not None else out / "tiny_decoder"
    info = _info(teacher_dir if teacher is None else None, ae, seed, str(dev), command, res)
    decoder.save_pretrained(export_dir, dtype=torch.float16, info=info)
    res["export"] = str(export_dir)
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1) + "\n"))
    return res


def _info(teacher_dir, ae, seed, device, command, res) -> dict:
    return {"teacher": str(teacher_dir) if teacher_dir is not None else None,
            "teacher_autoencoder": ae.cfg.to_dict(), "seed": seed, "device": device, "command": command,
            "corpus": {"split": "train", **{k: res["train"][k] for k in ("pool_size", "pool_seed", "views", "frames",
                                                                        "frame_stride")}},
            "run": {k: res.get(k) for k in ("steps", "wall_s", "stopped_by", "final_loss", "data_s")},
            "recipe": res["train"]}


def export_checkpoint(run_dir, export_dir, *, command: str | None = None) -> Path:
    """Write the tiny decoder of a run's checkpoint (``checkpoint.safetensors`` + ``.json``) to ``export_dir``."""
    run_dir = Path(run_dir)
    ckpt, meta_path = run_dir / "checkpoint.safetensors", run_dir / "checkpoint.json"
    if not ckpt.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"no tiny-decoder checkpoint in {run_dir} (checkpoint.safetensors + checkpoint.json)")
    meta = json.loads(meta_path.read_text())
    decoder = TinyDecoder(TinyDecoderConfig.from_dict(meta["config"]))
    tensors = {k[len("model."):]: v for k, v in load_file(str(ckpt)).items() if k.startswith("model.")}
    decoder.load_state_dict(tensors)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    info = {"run": {"steps": meta["step"], **{k: summary.get(k) for k in ("wall_s", "stopped_by", "final_loss",
                                                                          "data_s")}},
            "recipe": meta.get("train"), "seed": meta.get("seed"), "command": command, "exported_from": str(run_dir)}
    return decoder.save_pretrained(export_dir, dtype=torch.float16, info=info)


# -------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def time_decoder(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, *, warmup: int = 3,
                 repeats: int = 15) -> dict:
    """Wall time of ``decode(latents)`` in ms: {p50, p90, min}."""
    for _ in range(warmup):
        decode(latents)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        decode(latents)
        ts.append((time.perf_counter() - t) * 1000)
    ts.sort()
    return {"p50": round(ts[len(ts) // 2], 2), "p90": round(ts[min(len(ts) - 1, int(0.9 * len(ts)))], 2),
            "min": round(ts[0], 2)}


def _stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    from mvportrait.evaluation.image_metrics import psnr, ssim

    a, b = (a.double().clamp(-1, 1) + 1) / 2, (b.double().clamp(-1, 1) + 1) / 2
    p, s = psnr(a, b), ssim(a, b)
    return {"psnr": round(float(p.mean()), 3), "psnr_std": round(float(p.std()), 3), "ssim": round(float(s.mean()), 4)}


@torch.no_grad()
def evaluate_decoder(decoder: TinyDecoder, autoencoder, *, n: int = 64, views: int = 4, seed: int = 0,
                     image_size: int = 128, timing: bool = True, repeats: int = 15, chunk: int = 16,
                     on_progress: Callable[[int], None] | None = None) -> dict:
    """Tiny vs ground truth, full decoder vs ground truth and tiny vs full (PSNR/SSIM on [0, 1]) on
    ``n`` held-out frames (one per clip of the corpus test split, seed ``seed``) x ``views`` views;
    with ``timing``: decode ms per batch of ``views`` latents at ``image_size`` for both decoders,
    float32 and bfloat16 + channels_last (the engine's CPU setting), on the current thread count."""
    images = render_images("test", n, seed, image_size=image_size, views=views, frames=1, frame_stride=1,
                           on_progress=on_progress)
    ae = autoencoder.eval()
    decoder = decoder.float().eval()
    gt, full, tiny = [], [], []
    for s in range(0, images.shape[0], chunk):
        x = images[s:s + chunk].float() / 127.5 - 1.0
        z = ae.encode(x)
        gt.append(x)
        full.append(ae.decode(z).clamp(-1, 1))
        tiny.append(decoder.decode(z))
    gt, full, tiny = torch.cat(gt), torch.cat(full), torch.cat(tiny)
    rep = {"n_frames": n, "views": views, "images": int(gt.shape[0]), "image_size": image_size, "seed": seed,
           "split": "test", "tiny_vs_gt": _stats(tiny, gt), "full_vs_gt": _stats(full, gt),
           "tiny_vs_full": _stats(tiny, full), "tiny_params": decoder.param_count(),
           "full_decoder_params": sum(p.numel() for m in (ae.decoder, ae.post_quant_conv) for p in m.parameters())}
    if timing:
        rep["timing"] = time_decoders(decoder, ae, batch=views, image_size=image_size, repeats=repeats)
    return rep


def time_decoders(decoder: TinyDecoder, autoencoder, *, batch: int = 4, image_size: int = 128,
                  repeats: int = 15) -> dict:
    """Decode ms per batch for the full and tiny decoders, float32 and bfloat16 + channels_last."""
    f = autoencoder.factor
    z = torch.randn(batch, autoencoder.cfg.latent_channels, image_size // f, image_size // f,
                    generator=torch.Generator().manual_seed(0))
    out = {"batch": batch, "image_size": image_size, "threads": torch.get_num_threads()}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        row = {}
        for which, mod in (("full", autoencoder), ("tiny", decoder)):
            m = copy.deepcopy(mod).to(dtype=dt).eval()
            if dt == torch.bfloat16:
                m = m.to(memory_format=torch.channels_last)
            zz = z.to(dt).contiguous(memory_format=torch.channels_last) if dt == torch.bfloat16 else z
            with torch.inference_mode():
                row[which] = time_decoder(m.decode, zz, repeats=repeats)
        row["speedup_p50"] = round(row["full"]["p50"] / row["tiny"]["p50"], 2)
        out[name] = row
    return out


def evaluate_weights(weights_dir, *, teacher_dir=None, n: int = 64, seed: int = 0, timing: bool = True,
                     on_progress: Callable[[int], None] | None = None) -> dict:
    """:func:`evaluate_decoder` for a tiny-decoder folder against a teacher folder (default: the shipped)."""
    teacher_dir = Path(teacher_dir) if teacher_dir is not None else _default_teacher()
    decoder = TinyDecoder.from_pretrained(weights_dir)
    model = _load_teacher(teacher_dir, "cpu")
    ae = model.autoencoder
    if (decoder.config.latent_channels, decoder.factor) != (ae.cfg.latent_channels, ae.factor):
        raise ValueError(f"{weights_dir}: the tiny decoder ({decoder.config.latent_channels} channels, factor "
                         f"{decoder.factor}) does not fit the teacher's autoencoder ({ae.cfg.latent_channels}, "
                         f"{ae.factor})")
    rep = evaluate_decoder(decoder, ae, n=n, views=model.config.views, seed=seed,
                           image_size=model.config.image_size, timing=timing, on_progress=on_progress)
    rep.update({"weights": str(weights_dir), "teacher": str(teacher_dir), "config": decoder.config.to_dict()})
    return rep
