"""Training recipe for the stage-2 reference model (FLAME2Video, preset ``tiny``), staged like the paper.

Stages (each its own command, resumable, checkpointing every ``checkpoint_every`` steps):

1. ``autoencoder`` -- the small KL autoencoder on single target images: L1 + MSE reconstruction +
   a tiny KL term (``kl_weight``).
2. ``spatial`` -- denoising UNet + reference UNet + image embedder + FLAME encoder on single frames
   (V = F = 1); the autoencoder is frozen. Reference dropout ``ref_drop`` (null image tokens, no
   reference K/V) trains the unconditional branch for image guidance.
3. ``temporal`` -- the temporal modules only, on one view x ``frames`` frames.
4. ``view`` -- the view modules only, on ``views`` views x ``frames`` frames.

Data: a pool of ``pool_size`` clips of :class:`mvportrait.data.multiview.MultiViewCorpus`
(``split="train"``, seed ``pool_seed``) rendered once at the start on the training device and
held in memory (targets as uint8, renders as float16). After the autoencoder stage the target
and reference latents of the pool are computed once with the frozen autoencoder (posterior mean).
Every step draws (clip, view, frame) picks from a generator seeded with (seed, stage, step), so a
resumed run repeats the uninterrupted one on the same device.

Diffusion: the schedule and prediction type of :class:`mvportrait.config.Stage2Config`
(DDPM, uniform timesteps); loss MSE on the prediction target; AdamW with warm-up then cosine
decay; gradient clipping; EMA of the trained parameters (exported). Checkpoints hold model, EMA
and AdamW state in safetensors (``OUT/<stage>/checkpoint.safetensors`` + ``checkpoint.json``);
the loss log is ``OUT/<stage>/loss.jsonl``; each stage ends by writing the whole model with
``FLAME2VideoModel.save_pretrained(OUT/final)``, which the next stage starts from.

    mvportrait train stage2 --stage autoencoder --out runs/s2 [--device cuda] [--steps N] ...
    mvportrait train stage2 --stage spatial     --out runs/s2 ...
    mvportrait train stage2 --stage temporal    --out runs/s2 ...
    mvportrait train stage2 --stage view        --out runs/s2 ...
    mvportrait train stage2 --stage all         --out runs/s2 ...   # the four in order
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mvportrait.config import Stage2Config, check_ints, check_numbers, replace_known
from mvportrait.engine.schedulers import NoiseSchedule
from mvportrait.fileio import atomic_write
from mvportrait.models.stage2 import FLAME2VideoModel
from mvportrait.train.common import StepBudget, enable_tf32, load_optimizer, optimizer_step, optimizer_tensors

log = logging.getLogger(__name__)

STAGES = ("autoencoder", "spatial", "temporal", "view")
_STAGE_CODE = {s: i + 1 for i, s in enumerate(STAGES)}


@dataclass(frozen=True)
class Stage2TrainConfig:
    """Hyper-parameters of one training stage; :data:`STAGE_DEFAULTS` holds the recipe's values."""

    stage: str = "spatial"
    steps: int = 2000
    batch: int = 16
    lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    log_every: int = 25
    checkpoint_every: int = 500
    pool_size: int = 256
    pool_seed: int = 0
    frame_stride: int = 2
    views: int = 1
    frames: int = 1
    ref_drop: float = 0.1
    kl_weight: float = 1e-6

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        check_ints(self, ("steps", "batch", "log_every", "checkpoint_every", "pool_size", "views", "frames",
                          "frame_stride"))
        check_ints(self, ("warmup",), minimum=0)
        check_numbers(self, ("lr", "ema", "ref_drop", "kl_weight", "grad_clip", "weight_decay"))
        if not 0 <= self.ref_drop < 1 or not 0 <= self.ema < 1:
            raise ValueError("ref_drop and ema must lie in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "Stage2TrainConfig":
        return replace_known(self, **kw)


STAGE_DEFAULTS = {
    "autoencoder": Stage2TrainConfig(stage="autoencoder", steps=3000, batch=32, lr=4e-4, ema=0.0),
    "spatial": Stage2TrainConfig(stage="spatial", steps=6000, batch=32, lr=3e-4, views=1, frames=1),
    "temporal": Stage2TrainConfig(stage="temporal", steps=1500, batch=8, lr=2e-4, views=1, frames=8),
    "view": Stage2TrainConfig(stage="view", steps=1500, batch=4, lr=2e-4, views=4, frames=8),
}


# ------------------------------------------------------------------------------------- data
class ClipPool:
    """``pool_size`` training clips rendered once, held on ``device``.

    ``target`` (N, V, F, 3, H, W) uint8; ``renders`` (N, V, F, Cr, H, W) float16;
    ``reference`` (N, 3, H, W) uint8; after :meth:`encode_latents`: ``latents`` (N, V, F, C, h, w)
    and ``ref_latents`` (N, C, h, w) float32.
    """

    def __init__(self, target, renders, reference):
        self.target, self.renders, self.reference = target, renders, reference
        self.latents = None
        self.ref_latents = None

    @property
    def size(self) -> int:
        return self.target.shape[0]

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    @staticmethod
    def to_float(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 127.5 - 1.0

    @classmethod
    def build(cls, cfg: Stage2Config, n: int, seed: int, device, *, frame_stride: int = 2, chunk: int = 8,
              on_progress: Callable[[int], None] | None = None) -> "ClipPool":
        from mvportrait.data.multiview import MultiViewCorpus

        corpus = MultiViewCorpus(split="train", seed=seed, image_size=cfg.image_size, views=cfg.views,
                                 frames=cfg.frames, frame_stride=frame_stride, device=device)
        tgt, ren, ref = [], [], []
        for s in range(0, n, chunk):
            b = corpus.batch(list(range(s, min(n, s + chunk))))
            tgt.append(cls.to_uint8(b["target"]))
            ren.append(b["renders"].to(torch.float16))
            ref.append(cls.to_uint8(b["reference"]))
            if on_progress:
                on_progress(len(range(s, min(n, s + chunk))))
        return cls(torch.cat(tgt), torch.cat(ren), torch.cat(ref))

    @torch.no_grad()
    def encode_latents(self, autoencoder, chunk: int = 64) -> None:
        n, v, f = self.target.shape[:3]
        flat = self.target.flatten(0, 2)
        lat = [autoencoder.encode(self.to_float(flat[s:s + chunk])) for s in range(0, flat.shape[0], chunk)]
        lat = torch.cat(lat)
        self.latents = lat.reshape(n, v, f, *lat.shape[1:])
        self.ref_latents = torch.cat([autoencoder.encode(self.to_float(self.reference[s:s + chunk]))
                                      for s in range(0, n, chunk)])

    def pick(self, g: torch.Generator, batch: int, views: int, frames: int):
        """Random clips, a random run of ``views`` views (cyclic) and ``frames`` consecutive frames
        (both capped at what the pool holds)."""
        n, v_all, f_all = self.target.shape[:3]
        views, frames = min(views, v_all), min(frames, f_all)
        dev = self.target.device
        idx = torch.randint(0, n, (batch,), generator=g)
        v0 = torch.randint(0, v_all, (batch,), generator=g)
        f0 = torch.randint(0, f_all - frames + 1, (batch,), generator=g)
        vi = (v0[:, None] + torch.arange(views)[None]) % v_all  # (B, V)
        fi = f0[:, None] + torch.arange(frames)[None]  # (B, F)
        bi = idx[:, None, None].expand(batch, views, frames)
        vv = vi[:, :, None].expand(batch, views, frames)
        ff = fi[:, None, :].expand(batch, views, frames)
        sel = (bi.to(dev), vv.to(dev), ff.to(dev))
        return idx.to(dev), sel


# ---------------------------------------------------------------------------------- helpers
def lr_at(step: int, tc: Stage2TrainConfig) -> float:
    """Linear warm-up over ``min(warmup, steps // 10)`` steps, then cosine decay to 0 at ``steps``."""
    warmup = min(tc.warmup, tc.steps // 10)
    if step < warmup:
        return tc.lr * (step + 1) / max(1, warmup)
    p = (step - warmup) / max(1, tc.steps - warmup)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _step_seed(seed: int, stage: str, step: int) -> int:
    return (seed * 1_000_003 + _STAGE_CODE[stage] * 7_919 + step) % (2**63 - 1)


def trainable_parameters(model: FLAME2VideoModel, stage: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs trained in ``stage``; everything else is frozen."""
    if stage == "autoencoder":
        keep = {id(p) for p in model.autoencoder.parameters()}
    elif stage == "spatial":
        keep = {id(p) for p in model.unet.spatial_parameters()}
        for m in (model.reference_unet, model.flame_encoder, model.image_embedder):
            keep |= {id(p) for p in m.parameters()}
    elif stage == "temporal":
        keep = {id(p) for p in model.unet.temporal_parameters()}
    else:
        keep = {id(p) for p in model.unet.view_parameters()}
    out = [(n, p) for n, p in model.named_parameters() if id(p) in keep]
    if not out:
        raise ValueError(f"stage {stage!r} has no trainable parameters in this model")
    return out


def _loss_autoencoder(model: FLAME2VideoModel, pool: ClipPool, g, tc: Stage2TrainConfig):
    _, sel = pool.pick(g, tc.batch, 1, 1)
    x = pool.to_float(pool.target[sel].flatten(0, 2))  # (B, 3, H, W)
    mean, logvar = model.autoencoder.encode_dist(x)
    eps = torch.randn(mean.shape, generator=g).to(mean.device)
    z = mean + torch.exp(0.5 * logvar) * eps
    ae_cfg = model.autoencoder.cfg
    rec = model.autoencoder.decode((z - ae_cfg.shift_factor) * ae_cfg.scaling_factor)
    l1 = (rec - x).abs().mean()
    l2 = F.mse_loss(rec, x)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    loss = l1 + l2 + tc.kl_weight * kl
    return loss, {"loss": loss, "l1": l1, "mse": l2, "kl": kl}


def _loss_diffusion(model: FLAME2VideoModel, pool: ClipPool, g, tc: Stage2TrainConfig,
                    schedule: NoiseSchedule, prediction: str):
    idx, sel = pool.pick(g, tc.batch, tc.views, tc.frames)
    x0 = pool.latents[sel]  # (B, V, F, C, h, w)
    renders = pool.renders[sel].float()  # (B, V, F, Cr, H, W)
    dev = x0.device
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=g).to(dev)
    noise = torch.randn(x0.shape, generator=g).to(dev)
    keep = (torch.rand(b, generator=g) >= tc.ref_drop).to(dev)  # False: reference dropped (CFG)
    x_t = schedule.add_noise(x0, noise, t)
    ref_lat = pool.ref_latents[idx]
    tokens = model.image_embedder(ref_lat)  # (B, L, D)
    cache = model.unet.build_reference_cache(model.reference_unet(ref_lat, tokens))
    tokens = torch.where(keep[:, None, None], tokens, model.image_embedder.null(b).to(tokens.dtype))
    feats = model.encode_renders(renders)
    out = model.unet(x_t, t, tokens, feats, cache, reference_mask=keep)
    target = schedule.training_target(prediction, x0, noise, t)
    loss = F.mse_loss(out.float(), target.float())
    return loss, {"loss": loss}


# ----------------------------------------------------------------------------------- train
def train_stage(model: FLAME2VideoModel, pool: ClipPool, tc: Stage2TrainConfig, out_dir: Path, *,
                seed: int = 0, resume: bool = False, device="cpu", stop_at: int | None = None,
                time_budget_s: float | None = None,
                on_step: Callable[[int, dict], None] | None = None) -> tuple[FLAME2VideoModel, Stage2TrainConfig]:
    """Train the parameters of ``tc.stage`` in place; returns (model with the EMA weights, the config run).

    ``time_budget_s`` fits the run to a wall-clock budget: the step rate is measured over every 20
    steps (after a 5-step warm-up) and the step count is set to what the rest of the budget allows
    (never above the configured count); the learning-rate schedule follows the new count. The config returned (and written to the checkpoint/log) holds the steps run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    model.requires_grad_(False)
    named = trainable_parameters(model, tc.stage)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params] if tc.ema > 0 else None
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    schedule = NoiseSchedule.from_kind(cfg.beta_schedule, cfg.train_timesteps)
    if tc.stage != "autoencoder" and pool.latents is None:
        pool.encode_latents(model.autoencoder.eval())
    ckpt, meta_path, log_path = out_dir / "checkpoint.safetensors", out_dir / "checkpoint.json", out_dir / "loss.jsonl"
    start = 0
    if resume and ckpt.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("train", {}).get("stage") != tc.stage or meta.get("config") != json.loads(json.dumps(cfg.to_dict())):
            raise ValueError(f"checkpoint {ckpt} belongs to another stage or config; use a new --out")
        tensors = load_file(str(ckpt), device=str(device))
        with torch.no_grad():
            for n, p in named:
                p.copy_(tensors[f"model.{n}"])
            if ema is not None:
                for n, e in zip(names, ema):
                    e.copy_(tensors[f"ema.{n}"])
        load_optimizer(opt, names, tensors)
        start = int(meta["step"])
        log.info("resumed stage %s from step %d", tc.stage, start)
    elif log_path.exists():
        log_path.unlink()

    def save_checkpoint(step: int) -> None:
        tensors = {f"model.{n}": p.detach().contiguous() for n, p in named}
        if ema is not None:
            tensors.update({f"ema.{n}": e.contiguous() for n, e in zip(names, ema)})
        tensors.update({k: v.contiguous() for k, v in optimizer_tensors(opt, names).items()})
        atomic_write(ckpt, lambda tmp: save_file(tensors, tmp))
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(
            {"step": step, "seed": seed, "config": cfg.to_dict(), "train": tc.to_dict()}, indent=1)))

    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    model.train()
    model.autoencoder.train(tc.stage == "autoencoder")
    t0 = time.perf_counter()
    acc: dict[str, float] = {}
    count = 0
    saved = start
    step = start
    budget = StepBudget(time_budget_s, start, tc.steps) if time_budget_s is not None else None
    while True:
        fit = budget.fit(step) if budget is not None else None  # the step count that fits the budget
        if fit is not None and fit != tc.steps:
            log.info("stage %s: %.3f s/step at step %d; %d steps fit the %.0f s budget (was %d)",
                     tc.stage, budget.rate, step, fit, time_budget_s, tc.steps)
            tc = tc.replace(steps=fit)
            end = tc.steps if stop_at is None else min(stop_at, tc.steps)
        if step >= end:
            break
        s = _step_seed(seed, tc.stage, step)
        g = torch.Generator().manual_seed(s)
        torch.manual_seed(s)
        if tc.stage == "autoencoder":
            loss, parts = _loss_autoencoder(model, pool, g, tc)
        else:
            loss, parts = _loss_diffusion(model, pool, g, tc, schedule, cfg.prediction)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage {tc.stage}: loss is {float(loss)} at step {step}")
        optimizer_step(opt, loss, params, lr_at(step, tc), tc.grad_clip)
        if ema is not None:
            with torch.no_grad():
                decay = min(tc.ema, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        for k, v in parts.items():
            acc[k] = acc.get(k, 0.0) + float(v.detach())
        count += 1
        done = step + 1
        if done % tc.log_every == 0 or done == end:
            row = {"step": done, "lr": lr_at(step, tc), **{k: v / count for k, v in acc.items()},
                   "elapsed_s": round(time.perf_counter() - t0, 2)}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            acc, count = {}, 0
        if on_step:
            on_step(done, {"loss": float(loss.detach())})
        if done % tc.checkpoint_every == 0 or done == end:
            save_checkpoint(done)
            saved = done
        step = done
    if count:  # a budget refit ended the run between log points
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, "lr": lr_at(step - 1, tc), **{k: v / count for k, v in acc.items()},
                                "elapsed_s": round(time.perf_counter() - t0, 2)}) + "\n")
    if step > start and saved != step:
        save_checkpoint(step)
    if ema is not None and end == tc.steps:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    model.requires_grad_(False)
    model.eval()
    return model, tc


@torch.no_grad()
def _calibrate_scaling(model: FLAME2VideoModel, pool: ClipPool, n: int = 512) -> float:
    """Set the autoencoder's ``scaling_factor`` to 1 / std of the pool's latents (posterior means),
    as SD did for its VAE, so the diffusion stages see unit-variance latents; returns it."""
    from dataclasses import replace as dc_replace

    ae = model.autoencoder
    ae.eval()
    flat = pool.target.flatten(0, 2)
    pick = torch.linspace(0, flat.shape[0] - 1, min(n, flat.shape[0])).long().to(flat.device)
    means = torch.cat([ae.encode_dist(pool.to_float(flat[pick[s:s + 64]]))[0] for s in range(0, len(pick), 64)])
    shift = float(means.mean())
    scale = 1.0 / max(float(means.std()), 1e-6)
    ae_cfg = dc_replace(ae.cfg, scaling_factor=round(scale, 5), shift_factor=round(shift, 5))
    ae.cfg = ae_cfg
    model.config = dc_replace(model.config, autoencoder=ae_cfg)
    log.info("autoencoder latents: mean %.4f, std %.4f -> shift_factor %.5f, scaling_factor %.5f",
             shift, 1 / scale, ae_cfg.shift_factor, ae_cfg.scaling_factor)
    return scale


def train_stage2(stage: str, out: str | Path, *, preset: str = "tiny", device="cpu", seed: int = 0,
                 resume: bool = False, overrides: dict | None = None, init: str | Path | None = None,
                 on_phase: Callable[[str, int], Callable] | None = None, command: str | None = None,
                 pool: ClipPool | None = None, time_budget_s: dict[str, float] | None = None,
                 stage_overrides: dict[str, dict] | None = None, config: Stage2Config | None = None) -> dict:
    """Run one stage (or ``"all"``) and write the model to ``OUT/final``; returns a summary dict.

    A stage after ``autoencoder`` starts from ``init`` (default ``OUT/final``, the previous stage's
    output). ``overrides`` replace :data:`STAGE_DEFAULTS` fields (``steps``, ``batch``, ...);
    ``time_budget_s`` maps a stage to a wall-clock budget for its training loop (see
    :func:`train_stage`). ``config`` replaces the preset for a fresh model (tests, experiments).
    """
    stages = STAGES if stage == "all" else (stage,)
    if stage != "all" and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES + ('all',)}, got {stage!r}")
    out = Path(out)
    device = torch.device(device)
    enable_tf32(device)
    final = out / "final"
    summary = {"preset": preset, "seed": seed, "device": str(device), "command": command, "stages": {},
               "fps": None}
    for st in stages:
        tc = STAGE_DEFAULTS[st].replace(**{**(overrides or {}), **(stage_overrides or {}).get(st, {})})
        start_from = Path(init) if (init and st == stages[0]) else final
        if st == "autoencoder" and not (start_from / "config.json").exists():
            torch.manual_seed(seed)
            model = FLAME2VideoModel(config if config is not None else Stage2Config.from_name(preset))
        else:
            if not (start_from / "config.json").exists():
                raise FileNotFoundError(f"stage {st!r} starts from a trained model in {start_from}; "
                                        f"run the earlier stages first (or pass --init DIR)")
            model = FLAME2VideoModel.from_pretrained(start_from, dtype=torch.float32)
        model = model.to(device)
        cfg = model.config
        if pool is None or pool.size < tc.pool_size:
            upd = on_phase("render training clips", tc.pool_size) if on_phase else None
            pool = ClipPool.build(cfg, tc.pool_size, tc.pool_seed, device, frame_stride=tc.frame_stride,
                                  on_progress=(lambda k: upd(k, {})) if upd else None)
        if st == stages[0] and st != "autoencoder":
            pool.latents = None  # encoded by the autoencoder of the model just loaded
        upd = on_phase(f"train stage2/{st}", tc.steps) if on_phase else None
        last = {"step": 0}

        def on_step(step, info, upd=upd, last=last):
            if upd:
                upd(step - last["step"], info)
            last["step"] = step

        t0 = time.perf_counter()
        _, tc = train_stage(model, pool, tc, out / st, seed=seed, resume=resume, device=device, on_step=on_step,
                            time_budget_s=(time_budget_s or {}).get(st))
        wall = time.perf_counter() - t0
        if st == "autoencoder":
            _calibrate_scaling(model, pool)
            pool.latents = None  # the next stage encodes with the trained autoencoder
        rows = [json.loads(l) for l in (out / st / "loss.jsonl").read_text().splitlines() if l.strip()]
        model.save_pretrained(final, dtype=torch.float32)  # training copy; ship with dtype=float16
        summary["fps"] = 25.0 / tc.frame_stride  # the corpus clips are 25 fps
        summary["stages"][st] = {"wall_s": round(wall, 1), "steps": tc.steps, "final_loss": rows[-1] if rows else None,
                                 "train": tc.to_dict()}
    summary["params"] = model.param_counts()
    atomic_write(final / "train_summary.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1) + "\n"))
    return summary


__all__ = ["train_stage2", "train_stage", "Stage2TrainConfig", "STAGE_DEFAULTS", "STAGES", "ClipPool",
           "trainable_parameters", "lr_at"]
