"""Training recipe for the stage-1 reference models (MotionDM and EmotionDM, trained separately).

Data: ``Text2FlameCorpus.generate(corpus_size, seed=corpus_seed, split="train")`` (100 frames =
4 s at 25 fps). Each clip gets ``captions_per_clip`` captions: the corpus caption plus re-captions
from the train wordings (seeded by (corpus_seed, clip, j)); all are encoded once with the text
encoder (MiniLM by default) and cached in ``OUT/cache``.

Recipe per model: DDPM (cosine schedule, 1000 steps), uniform timesteps, x0 prediction,
``L = L_simple + 0.5 L_velocity``, text dropout ``cond_drop`` for classifier-free guidance, AdamW,
linear warm-up then cosine decay of the learning rate, gradient clipping, EMA of the weights (the
EMA weights are exported).

Determinism and resume: every random draw of step ``k`` comes from generators seeded with
``(seed, kind, k)`` (batch, captions, timesteps, noise, text dropout, and the global torch seed for
attention dropout), so a run resumed from a checkpoint reproduces the uninterrupted run. Checkpoints
(``OUT/<kind>/checkpoint.safetensors`` + ``checkpoint.json``) hold model, EMA and AdamW state as
plain tensors in safetensors; nothing is ever unpickled.

Outputs: ``OUT/<kind>/loss.jsonl`` (one JSON line per ``log_every`` steps) and, at the end,
:func:`export_weights` writes ``<kind>.safetensors`` (fp16) + ``<kind>.json`` to ``OUT/final``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mvportrait.config import DenoiserConfig, Stage1TrainConfig
from mvportrait.data.corpus import Text2FlameCorpus
from mvportrait.engine.schedulers import NoiseSchedule
from mvportrait.fileio import atomic_write
from mvportrait.models.motion_denoiser import MotionDenoiser, diffusion_loss

log = logging.getLogger(__name__)

KINDS = ("motion", "emotion")
_KIND_CODE = {"motion": 1, "emotion": 2}
WEIGHTS_FORMAT = 1


# ------------------------------------------------------------------------------------ data
def caption_texts(corpus: Text2FlameCorpus, kind: str, per_clip: int, seed: int) -> list[list[str]]:
    """(N, per_clip) captions of ``kind`` per clip: the corpus caption, then re-captions."""
    out = []
    for i in range(len(corpus)):
        caps = [corpus.motion_captions[i] if kind == "motion" else corpus.emotion_captions[i]]
        for j in range(1, per_clip):
            rng = np.random.default_rng([seed, 7, i, j])
            m, e, _ = corpus.recaption(i, rng)
            caps.append(m if kind == "motion" else e)
        out.append(caps)
    return out


def encode_captions(encoder, captions: list[list[str]], batch: int = 512,
                    on_progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, C, text_dim) float32 pooled embeddings of a caption table (unique texts encoded once)."""
    flat = [c for row in captions for c in row]
    unique = sorted(set(flat))
    index = {c: k for k, c in enumerate(unique)}
    emb = np.empty((len(unique), encoder.dim), np.float32)
    for s in range(0, len(unique), batch):
        chunk = unique[s:s + batch]
        emb[s:s + len(chunk)] = encoder.encode(chunk).pooled.float().cpu().numpy()
        if on_progress:
            on_progress(len(chunk))
    idx = np.array([[index[c] for c in row] for row in captions])
    return emb[idx]


def load_data(kind: str, train_cfg: Stage1TrainConfig, encoder, encoder_name: str, cache_dir: Path | None,
              frames: int = 100, on_progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, T, D), text (N, C, text_dim)) for ``kind``; text embeddings cached in ``cache_dir``."""
    corpus = Text2FlameCorpus.generate(train_cfg.corpus_size, seed=train_cfg.corpus_seed, frames=frames)
    x = corpus.motion_features() if kind == "motion" else corpus.expression
    key = (f"{kind}-{encoder_name}-{train_cfg.corpus_seed}-{train_cfg.corpus_size}-"
           f"{train_cfg.captions_per_clip}-{frames}")
    path = cache_dir / f"text-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npy" if cache_dir else None
    if path is not None and path.exists():
        text = np.load(path, allow_pickle=False)
        if text.shape[:2] == (len(corpus), train_cfg.captions_per_clip):
            return x, text
    caps = caption_texts(corpus, kind, train_cfg.captions_per_clip, train_cfg.corpus_seed)
    text = encode_captions(encoder, caps, on_progress=on_progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, text)

        atomic_write(path, write)
    return x, text


# ---------------------------------------------------------------------------------- helpers
def make_schedule(cfg: DenoiserConfig) -> NoiseSchedule:
    return NoiseSchedule.from_kind(cfg.beta_schedule, cfg.train_timesteps)


def lr_at(step: int, tc: Stage1TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _step_seed(seed: int, kind: str, step: int) -> int:
    return (seed * 1_000_003 + _KIND_CODE[kind] * 7_919 + step) % (2**63 - 1)


def _optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    params = opt.param_groups[0]["params"]
    for name, p in zip(names, params):
        st = opt.state.get(p)
        if not st:
            continue
        out[f"opt.{name}.exp_avg"] = st["exp_avg"]
        out[f"opt.{name}.exp_avg_sq"] = st["exp_avg_sq"]
        out[f"opt.{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    params = opt.param_groups[0]["params"]
    for name, p in zip(names, params):
        key = f"opt.{name}.exp_avg"
        if key not in tensors:
            continue
        opt.state[p] = {"exp_avg": tensors[key].clone(), "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].clone(),
                        "step": tensors[f"opt.{name}.step"].reshape(()).clone()}


# ----------------------------------------------------------------------------------- train
def train_model(kind: str, cfg: DenoiserConfig, tc: Stage1TrainConfig, x: np.ndarray, text: np.ndarray,
                out_dir: Path, *, seed: int = 0, resume: bool = False, stop_at: int | None = None,
                on_step: Callable[[int, dict], None] | None = None) -> MotionDenoiser:
    """Train one denoiser on ``x`` (N, T, D) with captions ``text`` (N, C, text_dim); returns the EMA model.

    ``stop_at`` ends the run early at that step (after writing a checkpoint), for tests of resume.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if x.shape[1] != cfg.max_frames or x.shape[2] != cfg.in_dim:
        raise ValueError(f"training data has shape {x.shape}, config expects (N, {cfg.max_frames}, {cfg.in_dim})")
    torch.manual_seed(seed)
    model = MotionDenoiser(cfg)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    model.set_normalization(xt.mean((0, 1)), xt.std((0, 1)))
    data = model.normalize(xt)  # (N, T, D)
    text_t = torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32))  # (N, C, E)
    ema = MotionDenoiser(cfg)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    schedule = make_schedule(cfg)
    ckpt, meta_path, log_path = out_dir / "checkpoint.safetensors", out_dir / "checkpoint.json", out_dir / "loss.jsonl"
    start = 0
    if resume and ckpt.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["config"] != cfg.to_dict():
            raise ValueError(f"checkpoint {ckpt} was trained with another config; use a new --out")
        tensors = load_file(str(ckpt))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        _load_optimizer(opt, names, tensors)
        start = int(meta["step"])
        log.info("resumed %s from step %d", kind, start)
    elif log_path.exists():
        log_path.unlink()

    def save_checkpoint(step: int) -> None:
        tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.state_dict().items()})
        tensors.update(_optimizer_tensors(opt, names))
        atomic_write(ckpt, lambda tmp: save_file(tensors, tmp))
        meta_path.write_text(json.dumps({"step": step, "kind": kind, "seed": seed, "config": cfg.to_dict(),
                                         "train": tc.to_dict()}, indent=1))

    n, c = text_t.shape[:2]
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    model.train()
    t0 = time.perf_counter()
    acc = {"loss": 0.0, "simple": 0.0, "velocity": 0.0}
    count = 0
    for step in range(start, end):
        s = _step_seed(seed, kind, step)
        g = torch.Generator().manual_seed(s)
        torch.manual_seed(s)  # attention / MLP dropout
        idx = torch.randint(0, n, (tc.batch,), generator=g)
        cap = torch.randint(0, c, (tc.batch,), generator=g)
        t = torch.randint(0, cfg.train_timesteps, (tc.batch,), generator=g)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=g)
        cond = model.drop_text(text_t[idx, cap], generator=g)
        x_t = schedule.add_noise(x0, noise, t)
        out = model(x_t, t, cond)
        if cfg.prediction == "sample":
            pred_x0 = out
        elif cfg.prediction == "v_prediction":  # x0 = sqrt(a) x_t - sqrt(1 - a) v: a skip connection from x_t
            pred_x0 = schedule.pred_x0_from_v(x_t, out, t)
        else:
            pred_x0 = schedule.pred_x0_from_eps(x_t, out, t)
        losses = diffusion_loss(pred_x0, x0, cfg.velocity_weight)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        with torch.no_grad():
            decay = tc.ema if tc.ema > 0 else 0.0
            decay = min(decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        for k in acc:
            acc[k] += float(losses[k].detach())
        count += 1
        done = step + 1
        if done % tc.log_every == 0 or done == end:
            row = {"step": done, "lr": lr_at(step, tc), **{k: v / count for k, v in acc.items()},
                   "elapsed_s": round(time.perf_counter() - t0, 2)}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            acc = {k: 0.0 for k in acc}
            count = 0
        if on_step:
            on_step(done, {k: float(v.detach()) for k, v in losses.items()})
        if done % tc.checkpoint_every == 0 or done == end:
            save_checkpoint(done)
    ema.eval()
    return ema


# ---------------------------------------------------------------------------------- export
def export_weights(model: MotionDenoiser, path_stem: Path, *, extra: dict | None = None,
                   dtype: torch.dtype = torch.float16) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` (weights in ``dtype``; mean/std buffers in float32) + ``<stem>.json``."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if k not in ("mean", "std") else v.float()).contiguous()
             for k, v in model.state_dict().items()}
    w, j = path_stem.with_suffix(".safetensors"), path_stem.with_suffix(".json")
    save_file(state, str(w), metadata={"format": str(WEIGHTS_FORMAT)})
    meta = {"format": WEIGHTS_FORMAT, "config": model.cfg.to_dict(), **(extra or {})}
    j.write_text(json.dumps(meta, indent=1) + "\n")
    return w, j


def load_weights(path_stem: Path, device: torch.device | str = "cpu") -> tuple[MotionDenoiser, dict]:
    """Inverse of :func:`export_weights`: (model in float32, eval mode; the JSON metadata)."""
    path_stem = Path(path_stem)
    w, j = path_stem.with_suffix(".safetensors"), path_stem.with_suffix(".json")
    for p in (w, j):
        if not p.is_file():
            raise FileNotFoundError(f"stage-1 weights file {p} is missing")
    meta = json.loads(j.read_text())
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{j} has weights format {meta.get('format')}, expected {WEIGHTS_FORMAT}")
    model = MotionDenoiser(DenoiserConfig.from_dict(meta["config"]))
    state = {k: v.float() for k, v in load_file(str(w)).items()}
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def train_stage1(preset: str, out: str | os.PathLike, *, steps: int | None = None, batch: int | None = None,
                 seed: int = 0, resume: bool = False, text_encoder: str = "minilm",
                 kinds: tuple[str, ...] = KINDS, train_overrides: dict | None = None,
                 config_overrides: dict | None = None, cache_dir: str | os.PathLike | None = None,
                 on_phase: Callable[[str, int], Callable] | None = None,
                 command: str | None = None) -> dict:
    """Train the requested denoisers with preset ``preset`` and export them to ``OUT/final``.

    ``on_phase(description, total) -> update(n, info)`` lets the caller show progress bars. Returns a
    summary dict (wall time per model, final losses, parameter counts, exported paths).
    """
    from mvportrait.models.text_encoder import load_text_encoder

    out = Path(out)
    tc = Stage1TrainConfig(**{**(train_overrides or {}), **({"steps": steps} if steps else {}),
                              **({"batch": batch} if batch else {})})
    encoder = load_text_encoder(text_encoder)
    summary = {"preset": preset, "seed": seed, "text_encoder": text_encoder, "train": tc.to_dict(), "models": {},
               "command": command}
    for kind in kinds:
        cfg = DenoiserConfig.from_name(preset, kind, **(config_overrides or {}))
        t0 = time.perf_counter()
        upd = on_phase(f"encode {kind} captions", tc.corpus_size * tc.captions_per_clip) if on_phase else None
        cache = Path(cache_dir) if cache_dir else out / "cache"
        x, text = load_data(kind, tc, encoder, text_encoder, cache, frames=cfg.max_frames,
                            on_progress=(lambda k: upd(k, {})) if upd else None)
        if cfg.in_dim != x.shape[-1]:
            cfg = cfg.replace(in_dim=int(x.shape[-1]))
        upd = on_phase(f"train {kind}DM ({preset})", tc.steps) if on_phase else None
        last = {"step": 0}

        def on_step(step, losses, upd=upd, last=last):
            if upd:
                upd(step - last["step"], losses)
            last["step"] = step

        ema = train_model(kind, cfg, tc, x, text, out / kind, seed=seed, resume=resume, on_step=on_step)
        wall = time.perf_counter() - t0
        rows = [json.loads(l) for l in (out / kind / "loss.jsonl").read_text().splitlines() if l.strip()]
        extra = {"kind": kind, "text_encoder": text_encoder, "preset": preset, "seed": seed,
                 "corpus": {"seed": tc.corpus_seed, "size": tc.corpus_size, "split": "train",
                            "frames": cfg.max_frames, "captions_per_clip": tc.captions_per_clip},
                 "train": tc.to_dict(), "final_loss": rows[-1] if rows else None, "params": ema.num_parameters()}
        w, _ = export_weights(ema, out / "final" / kind, extra=extra)
        summary["models"][kind] = {"params": ema.num_parameters(), "wall_s": round(wall, 1),
                                   "final_loss": rows[-1] if rows else None, "weights": str(w),
                                   "bytes": w.stat().st_size}
    (out / "final").mkdir(parents=True, exist_ok=True)
    (out / "final" / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


__all__ = ["train_stage1", "train_model", "export_weights", "load_weights", "load_data", "caption_texts",
           "encode_captions", "lr_at", "make_schedule", "KINDS"]
