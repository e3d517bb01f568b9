"""Latent consistency distillation (LCM, Luo et al. 2023) of the shipped teachers into few-step students.

One loop (:func:`distill`) serves both stages; a *task* supplies the data, the teacher's guided
prediction and the student's forward pass:

- :class:`Stage1Task` -- MotionDM / EmotionDM on the stage-1 corpus's training split (the clips,
  captions and MiniLM token features of :func:`mvportrait.train.stage1.load_data`).
- :class:`Stage2Task` -- the denoising UNet of FLAME2Video on the multi-view corpus's training
  clips (:class:`mvportrait.train.stage2.ClipPool`); autoencoder, reference UNet, image embedder and
  FLAME encoder stay frozen at the teacher's weights (the reference K/V and FLAME features are the
  teacher's). Clips are smaller than the model's 4 views x 8 frames (default 2 x 4) to fit CPU time;
  the UNet is shape-agnostic over views and frames, and the student samples 4 x 8 windows.

One step (with the teacher's noise schedule, T = 1000, skip k = 20, so the DDIM solver works on the
trailing 50-step grid t_n in {19, 39, ..., 999})::

    x0, cond ~ data;  n ~ U{0..49};  t = 19 + 20 n;  s = max(t - 20, 0);  x_t = q(x_t | x0)
    teacher      o   = o_u + w (o_c - o_u)              guidance w folded in (fixed: the teacher
                                                        config's default, 2.5 motion/emotion, 2.0 stage 2)
    DDIM solver  x_s = sqrt(a_s) x0_hat(o) + sqrt(1 - a_s) eps_hat(o)       (eta = 0)
    student      f   = consistency_x0(student(x_t, t, cond), x_t, t)        c_skip x_t + c_out x0_pred
    target       f^- = consistency_x0(target(x_s, s, cond), x_s, s)         (= x_s at s = 0), no grad
    loss         d(f, f^-): "l2" mean square, or "huber" sqrt((f - f^-)^2 + c^2) - c (pseudo-Huber)
                 [+ velocity_weight * d over frame differences for stage 1, as the teachers' loss]
    target network: EMA of the student, decay ``target_ema`` (0.95, as LCM)

``consistency_x0`` and the noise schedule are :mod:`mvportrait.engine.schedulers`'s, the same the
``ConsistencySampler`` uses to sample, so training targets and sampling agree. The student starts
as a copy of the teacher; it is always called on the conditional input (no text / reference
dropout). All networks run in eval mode (no dropout) so a step is a deterministic function of its
seed. Optimiser: AdamW, linear warm-up then a constant learning rate (LCM), gradient clipping.

Run control: every draw of step ``k`` comes from a generator seeded with (seed, task, k), so a run
resumed from ``OUT/checkpoint.safetensors`` (student, target and AdamW state; ``checkpoint.json``
holds the step) repeats the uninterrupted run. ``time_budget_s`` ends the loop once the next step
would not fit, then checkpoints. Losses go to ``OUT/loss.jsonl``. The exported student is the
target (EMA) network, as in LCM, written with only the tensors that were trained
(:mod:`mvportrait.models.students`).

    mvportrait distill stage1 --kind both --out /work/runs/distill/s1 ...
    mvportrait distill stage2 --out /work/runs/distill/s2 ...
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
from safetensors.torch import load_file, save_file

from mvportrait.config import check_ints, check_numbers, replace_known
from mvportrait.engine.schedulers import DDIMSampler, NoiseSchedule, combine_guidance, consistency_x0
from mvportrait.fileio import atomic_write, write_checkpoint
from mvportrait.train.common import enable_tf32, load_optimizer, optimizer_tensors, optimizer_step

log = logging.getLogger(__name__)

LOSSES = ("l2", "huber")
SUBSETS = ("all", "no-ff")
_TASK_CODE = {"motion": 11, "emotion": 12, "stage2": 21}


@dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of one distillation run (see the module docstring for the math)."""

    steps: int = 2000
    batch: int = 32
    lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    target_ema: float = 0.95
    skip: int = 20
    loss: str = "l2"
    huber_c: float = 1e-3
    guidance: float | None = None  # None: the teacher config's default guidance
    velocity_weight: float = 0.0
    subset: str = "all"  # stage 1: "all" or "no-ff" (the feed-forward layers stay the teacher's)
    log_every: int = 25
    checkpoint_every: int = 200
    default_steps: int = 2
    # stage-1 data
    corpus_size: int = 4000
    corpus_seed: int = 0
    captions_per_clip: int = 3
    # stage-2 data
    pool_size: int = 96
    pool_seed: int = 0
    views: int = 2
    frames: int = 4
    frame_stride: int = 2

    def __post_init__(self):
        check_ints(self, ("steps", "batch", "skip", "log_every", "checkpoint_every", "default_steps", "corpus_size",
                          "captions_per_clip", "pool_size", "views", "frames", "frame_stride"))
        check_ints(self, ("warmup", "corpus_seed", "pool_seed"), minimum=0)
        check_numbers(self, ("lr", "weight_decay", "grad_clip", "huber_c", "velocity_weight"))
        if not self.lr > 0:
            raise ValueError(f"DistillConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.target_ema < 1:
            raise ValueError(f"DistillConfig.target_ema must lie in [0, 1), got {self.target_ema}")
        if self.loss not in LOSSES:
            raise ValueError(f"DistillConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "huber" and not self.huber_c > 0:
            raise ValueError("the pseudo-Huber loss needs huber_c > 0")
        if self.subset not in SUBSETS:
            raise ValueError(f"DistillConfig.subset must be one of {SUBSETS}, got {self.subset!r}")
        if self.guidance is not None and (isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float))
                                          or not math.isfinite(self.guidance) or self.guidance < 0):
            raise ValueError(f"DistillConfig.guidance must be None or a finite number >= 0, got {self.guidance!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "DistillConfig":
        return replace_known(self, **kw)


DEFAULTS = {
    "motion": DistillConfig(steps=3000, batch=32, lr=1e-4, velocity_weight=0.5, subset="no-ff"),
    "emotion": DistillConfig(steps=3000, batch=32, lr=1e-4, velocity_weight=0.5, subset="all"),
    "stage2": DistillConfig(steps=4000, batch=1, lr=1e-4, views=2, frames=4, pool_size=96),
}


# ------------------------------------------------------------------------------------ core
def solver_timesteps(num_train_timesteps: int, skip: int, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) for grid indices ``n`` (B,): ``t = T - 1 - skip * (T // skip - 1 - n)`` on the trailing grid
    (T=1000, skip=20: 19, 39, ..., 999) and ``s = max(t - skip, 0)``."""
    T = num_train_timesteps
    if skip < 1 or T // skip < 1:
        raise ValueError(f"skip must be in [1, {T}], got {skip}")
    t = (T - 1) - skip * (T // skip - 1 - n)
    return t, (t - skip).clamp(min=0)


def grid_size(num_train_timesteps: int, skip: int) -> int:
    return num_train_timesteps // skip


def teacher_target(sampler: DDIMSampler, guided: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   s: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step of the guided teacher output from ``t`` to ``s`` (per-sample (B,))."""
    return sampler.step(guided, t, x_t, prev_t=s, eta=0.0).prev_sample


def distance(a: torch.Tensor, b: torch.Tensor, kind: str, c: float) -> torch.Tensor:
    """Mean over all elements of ``(a - b)^2`` ("l2") or ``sqrt((a - b)^2 + c^2) - c`` ("huber")."""
    d = a.float() - b.float()
    if kind == "l2":
        return d.pow(2).mean()
    return (torch.sqrt(d.pow(2) + c * c) - c).mean()


class DistillTask:
    """What :func:`distill` needs from a stage. Subclasses set ``name`` (motion | emotion | stage2),
    ``schedule``, ``prediction``, ``guidance``, ``frame_dim`` (for the velocity term, or None),
    ``student`` / ``target`` (modules with the same parameters) and ``trained`` (the student's
    (name, parameter) pairs)."""

    name: str
    schedule: NoiseSchedule
    prediction: str
    guidance: float
    frame_dim: int | None = None

    def batch(self, g: torch.Generator, size: int):
        """(x0, cond) for one step, drawn from ``g``."""
        raise NotImplementedError

    def teacher(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """Guided teacher model output (prediction type ``self.prediction``), no grad."""
        raise NotImplementedError

    def run(self, net, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """Model output of ``net`` (the student or the target) on the conditional input."""
        raise NotImplementedError


def consistency_loss(task: DistillTask, target_net, x0: torch.Tensor, cond, g: torch.Generator,
                     dc: DistillConfig, sampler: DDIMSampler) -> tuple[torch.Tensor, dict]:
    """The LCM loss of one batch (module docstring); returns (loss, parts)."""
    b, dev = x0.shape[0], x0.device
    n = torch.randint(0, grid_size(task.schedule.num_train_timesteps, dc.skip), (b,), generator=g)
    t, s = solver_timesteps(task.schedule.num_train_timesteps, dc.skip, n)
    noise = torch.randn(x0.shape, generator=g).to(dev)
    t, s = t.to(dev), s.to(dev)
    x_t = task.schedule.add_noise(x0, noise, t)
    with torch.no_grad():
        x_s = teacher_target(sampler, task.teacher(x_t, t, cond), x_t, t, s)
        f_target = consistency_x0(task.schedule, task.prediction, task.run(target_net, x_s, s, cond), x_s, s)
    f = consistency_x0(task.schedule, task.prediction, task.run(task.student, x_t, t, cond), x_t, t)
    main = distance(f, f_target, dc.loss, dc.huber_c)
    parts = {"consistency": main}
    loss = main
    if task.frame_dim is not None and dc.velocity_weight > 0:
        vel = distance(f.diff(dim=task.frame_dim), f_target.diff(dim=task.frame_dim), dc.loss, dc.huber_c)
        parts["velocity"] = vel
        loss = main + dc.velocity_weight * vel
    parts["loss"] = loss
    return loss, parts


def _step_seed(seed: int, task: str, step: int) -> int:
    return (seed * 1_000_003 + _TASK_CODE[task] * 7_919 + step) % (2**63 - 1)


def lr_at(step: int, dc: DistillConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (LCM)."""
    return dc.lr * min(1.0, (step + 1) / max(1, dc.warmup))


def distill(task: DistillTask, dc: DistillConfig, out_dir: str | Path, *, seed: int = 0, resume: bool = False,
            stop_at: int | None = None, time_budget_s: float | None = None,
            on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run the consistency distillation of ``task`` into ``out_dir``; ``task.target`` ends holding the
    exported (EMA target) weights. Returns a summary (steps run, final losses, wall time, stop reason).

    ``stop_at`` ends early at that step (tests of resume); ``time_budget_s`` stops cleanly (checkpoint
    written) once the next step would pass the budget; ``on_step(step, info)`` after every step.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    named = list(task.trained)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    target_params = dict(task.target.named_parameters())
    tparams = [target_params[n] for n in names]
    task.student.requires_grad_(False)
    task.target.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    task.student.eval()
    task.target.eval()
    opt = torch.optim.AdamW(params, lr=dc.lr, weight_decay=dc.weight_decay)
    sampler = DDIMSampler(task.schedule, prediction_type=task.prediction, timestep_spacing="trailing")
    ckpt, meta_path, log_path = out_dir / "checkpoint.safetensors", out_dir / "checkpoint.json", out_dir / "loss.jsonl"
    identity = {"task": task.name, "distill": dc.to_dict(), "seed": seed, "guidance": task.guidance}
    start = 0
    if resume and ckpt.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in identity} != json.loads(json.dumps(identity)):
            raise ValueError(f"checkpoint {ckpt} belongs to another task, recipe or seed; use a new --out "
                             "(or the same options as the run being resumed)")
        dev = str(params[0].device)
        tensors = load_file(str(ckpt), device=dev)
        with torch.no_grad():
            for n, p, tp in zip(names, params, tparams):
                p.copy_(tensors[f"student.{n}"])
                tp.copy_(tensors[f"target.{n}"])
        load_optimizer(opt, names, tensors)
        start = int(meta["step"])
        log.info("resumed %s distillation from step %d", task.name, start)
    elif log_path.exists():
        log_path.unlink()

    def save_checkpoint(step: int) -> None:
        tensors = {f"student.{n}": p.detach().contiguous() for n, p in zip(names, params)}
        tensors.update({f"target.{n}": p.detach().contiguous() for n, p in zip(names, tparams)})
        tensors.update({k: v.contiguous() for k, v in optimizer_tensors(opt, names).items()})
        atomic_write(ckpt, lambda tmp: save_file(tensors, tmp))
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps({"step": step, **identity}, indent=1)))

    end = dc.steps if stop_at is None else min(stop_at, dc.steps)
    t0 = time.perf_counter()
    acc: dict[str, float] = {}
    count, step, saved, reason = 0, start, start, "steps"
    last_step_s = 0.0
    while step < end:
        if time_budget_s is not None and (time.perf_counter() - t0) + 1.2 * last_step_s > time_budget_s:
            reason = "time budget"
            break
        ts = time.perf_counter()
        sd = _step_seed(seed, task.name, step)
        g = torch.Generator().manual_seed(sd)
        torch.manual_seed(sd)
        x0, cond = task.batch(g, dc.batch)
        loss, parts = consistency_loss(task, task.target, x0, cond, g, dc, sampler)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{task.name} distillation: loss is {float(loss)} at step {step}")
        optimizer_step(opt, loss, params, lr_at(step, dc), dc.grad_clip)
        with torch.no_grad():
            torch._foreach_lerp_(tparams, [p.detach() for p in params], 1.0 - dc.target_ema)
        for k, v in parts.items():
            acc[k] = acc.get(k, 0.0) + float(v.detach())
        count += 1
        step += 1
        info = {}
        if step % dc.log_every == 0 or step == end:
            info = {k: v / count for k, v in acc.items()}
            row = {"step": step, "lr": lr_at(step - 1, dc), **info, "elapsed_s": round(time.perf_counter() - t0, 2)}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            acc, count = {}, 0
        if on_step:
            on_step(step, info)
        if step % dc.checkpoint_every == 0 or step == end:
            save_checkpoint(step)
            saved = step
        last_step_s = time.perf_counter() - ts
    if count:
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, "lr": lr_at(step - 1, dc), **{k: v / count for k, v in acc.items()},
                                "elapsed_s": round(time.perf_counter() - t0, 2)}) + "\n")
    if step > start and saved != step:
        save_checkpoint(step)
    for p in params:
        p.requires_grad_(False)
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    return {"task": task.name, "steps": step, "start": start, "stopped_by": reason,
            "wall_s": round(time.perf_counter() - t0, 1), "first_loss": rows[0] if rows else None,
            "final_loss": rows[-1] if rows else None, "distill": dc.to_dict(), "guidance": task.guidance, "seed": seed}


# ----------------------------------------------------------------------------------- stage 1
def _is_feed_forward(name: str) -> bool:
    return ".linear1." in name or ".linear2." in name


class Stage1Task(DistillTask):
    """MotionDM / EmotionDM distillation; ``x`` (N, T, D) clips in model units, ``table`` their captions."""

    def __init__(self, kind: str, teacher, x, table, dc: DistillConfig, device="cpu"):
        import copy

        import numpy as np

        from mvportrait.train.stage1 import make_schedule

        if kind not in ("motion", "emotion"):
            raise ValueError(f"kind must be motion or emotion, got {kind!r}")
        self.name = kind
        self.teacher_model = teacher.to(device).eval().requires_grad_(False)
        cfg = teacher.cfg
        self.tokens = cfg.text_cond == "tokens"
        if self.tokens and not table.has_tokens:
            raise ValueError("a text_cond='tokens' teacher needs a caption table with token features")
        if x.shape[1] != cfg.max_frames or x.shape[2] != cfg.in_dim:
            raise ValueError(f"data has shape {tuple(x.shape)}, the teacher expects (N, {cfg.max_frames}, {cfg.in_dim})")
        if table.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} clips but captions for {table.shape[0]}")
        self.schedule = make_schedule(cfg)
        self.prediction = cfg.prediction
        self.guidance = float(cfg.guidance if dc.guidance is None else dc.guidance)
        self.frame_dim = 1
        self.student = copy.deepcopy(self.teacher_model)
        self.target = copy.deepcopy(self.teacher_model)
        self.trained = [(n, p) for n, p in self.student.named_parameters()
                        if dc.subset == "all" or not _is_feed_forward(n)]
        with torch.no_grad():
            xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)
            self.data = self.teacher_model.normalize(xt)  # (N, T, D)
        self.table = table.to(device)
        self.device = torch.device(device)

    def batch(self, g, size):
        n, c = self.table.shape
        idx = torch.randint(0, n, (size,), generator=g).to(self.device)
        cap = torch.randint(0, c, (size,), generator=g).to(self.device)
        return self.data[idx], self.table.gather(idx, cap, self.tokens)

    def teacher(self, x_t, t, cond):
        m, b = self.teacher_model, x_t.shape[0]
        if self.tokens:
            tok, mask = cond
            ntok, nmask = m.null(b, tok.shape[1])
            out = m(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([tok, ntok.to(tok.dtype)]),
                    torch.cat([mask, nmask]))
        else:
            out = m(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, m.null(b).to(cond.dtype)]))
        out_c, out_u = out.chunk(2)
        return combine_guidance(out_u, out_c, self.guidance)

    def run(self, net, x_t, t, cond):
        return net(x_t, t, *cond) if self.tokens else net(x_t, t, cond)


def export_stage1_student(task: Stage1Task, path_stem: str | Path, teacher_stem: str | Path, *,
                          dc: DistillConfig, extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` (the trained tensors of the EMA target, fp16) + ``<stem>.json``
    (teacher config with guidance 1.0 and the ``distill`` object of :mod:`mvportrait.models.students`)."""
    import os

    from mvportrait.models.students import STAGE1_FORMAT

    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in task.trained]
    tparams = dict(task.target.named_parameters())
    state = {n: tparams[n].detach().to("cpu", torch.float16).contiguous() for n in names}
    w, j = path_stem.with_suffix(".safetensors"), path_stem.with_suffix(".json")
    atomic_write(w, lambda tmp: save_file(state, tmp, metadata={"format": str(STAGE1_FORMAT)}))
    rel = os.path.relpath(Path(teacher_stem).resolve(), path_stem.parent.resolve())
    info = {"sampler": "consistency", "guidance": task.guidance, "teacher": rel, "default_steps": dc.default_steps,
            "method": "latent consistency distillation (LCM)", "trained": dc.subset,
            "stored_params": int(sum(v.numel() for v in state.values())),
            "solver": f"DDIM, trailing {grid_size(task.schedule.num_train_timesteps, dc.skip)}-step grid, skip {dc.skip}",
            "target_ema": dc.target_ema, "loss": dc.loss}
    meta = {"format": STAGE1_FORMAT, "config": task.teacher_model.cfg.replace(guidance=1.0).to_dict(), "kind": task.name,
            **(extra or {}), "distill": info}
    atomic_write(j, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))
    return w, j


def distill_stage1(out: str | Path, *, kinds: tuple[str, ...] = ("motion", "emotion"), teacher_dir=None,
                   export_dir=None, text_encoder: str = "minilm", text_model=None, cache_dir=None,
                   device="cpu", seed: int = 0, resume: bool = False, overrides: dict | None = None,
                   time_budget_s: dict[str, float] | None = None,
                   on_phase: Callable[[str, int], Callable] | None = None, command: str | None = None) -> dict:
    """Distil the stage-1 teachers ``<teacher_dir>/<kind>`` into ``<export_dir>/<kind>_student`` (default
    export: ``OUT/final``); per-kind runs in ``OUT/<kind>``. ``overrides`` replace :data:`DEFAULTS`
    fields; ``time_budget_s`` maps a kind to a wall-clock budget. Returns a summary dict."""
    from mvportrait.config import Stage1TrainConfig
    from mvportrait.engine.text2flame import DEFAULT_WEIGHTS
    from mvportrait.models.students import distill_info, load_stage1
    from mvportrait.models.text_encoder import open_text_encoder
    from mvportrait.train.stage1 import load_data, resolve_device

    out = Path(out)
    teacher_dir = Path(teacher_dir) if teacher_dir is not None else DEFAULT_WEIGHTS
    export_dir = Path(export_dir) if export_dir is not None else out / "final"
    dev = resolve_device(device)
    bad = [k for k in kinds if k not in ("motion", "emotion")]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of (motion, emotion), got {kinds!r}")
    encoder = None
    summary = {"seed": seed, "device": str(dev), "command": command, "models": {}}
    for kind in kinds:
        dc = DEFAULTS[kind].replace(**(overrides or {}))
        teacher, tmeta = load_stage1(teacher_dir / kind)
        if distill_info(tmeta) is not None:
            raise ValueError(f"{teacher_dir / kind} is a student; distil from a teacher")
        if encoder is None:
            encoder = open_text_encoder(tmeta.get("text_encoder", text_encoder), text_model, device=dev)
        tc = Stage1TrainConfig(corpus_size=dc.corpus_size, corpus_seed=dc.corpus_seed,
                               captions_per_clip=dc.captions_per_clip)
        upd = on_phase(f"encode {kind} captions", tc.corpus_size * tc.captions_per_clip) if on_phase else None
        x, table = load_data(kind, tc, encoder, tmeta.get("text_encoder", text_encoder), cache_dir,
                             frames=teacher.cfg.max_frames, tokens=teacher.cfg.text_cond == "tokens",
                             on_progress=(lambda k, upd=upd: upd(k, {})) if upd else None)
        task = Stage1Task(kind, teacher, x, table, dc, device=dev)
        res = _run(task, dc, out / kind, seed, resume, (time_budget_s or {}).get(kind), on_phase,
                   f"distil {kind}DM")
        extra = {"text_encoder": tmeta.get("text_encoder", text_encoder), "preset": tmeta.get("preset"),
                 "seed": seed, "params": teacher.num_parameters(),
                 "corpus": {"seed": dc.corpus_seed, "size": dc.corpus_size, "split": "train",
                            "captions_per_clip": dc.captions_per_clip},
                 "distill_run": {k: res[k] for k in ("steps", "wall_s", "stopped_by", "final_loss")},
                 "distill_recipe": dc.to_dict(), "device": str(dev), "command": command}
        w, _ = export_stage1_student(task, export_dir / f"{kind}_student", teacher_dir / kind, dc=dc, extra=extra)
        res["weights"], res["bytes"] = str(w), w.stat().st_size
        summary["models"][kind] = res
    return summary


def _run(task, dc, out_dir, seed, resume, budget, on_phase, desc) -> dict:
    upd = on_phase(desc, dc.steps) if on_phase else None
    last = {"step": None}

    def on_step(step, info):
        if upd:
            upd(step - (last["step"] if last["step"] is not None else step - 1), info)
        last["step"] = step

    return distill(task, dc, out_dir, seed=seed, resume=resume, time_budget_s=budget, on_step=on_step)


# ----------------------------------------------------------------------------------- stage 2
class Stage2Task(DistillTask):
    """Distillation of FLAME2Video's denoising UNet; ``pool`` holds encoded training clips."""

    def __init__(self, model, pool, dc: DistillConfig):
        import copy

        self.name = "stage2"
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.schedule = NoiseSchedule.from_kind(cfg.beta_schedule, cfg.train_timesteps)
        self.prediction = cfg.prediction
        self.guidance = float(cfg.guidance if dc.guidance is None else dc.guidance)
        self.frame_dim = None
        if pool.latents is None:
            pool.encode_latents(model.autoencoder)
        self.pool, self.views, self.frames = pool, dc.views, dc.frames
        self.student = copy.deepcopy(model.unet)
        self.target = copy.deepcopy(model.unet)
        self.trained = list(self.student.named_parameters())

    @torch.no_grad()
    def batch(self, g, size):
        from mvportrait.models.stage2 import ReferenceContext

        m, pool = self.model, self.pool
        idx, sel = pool.pick(g, size, self.views, self.frames)
        x0 = pool.latents[sel]  # (B, V, F, C, h, w)
        feats = m.encode_renders(pool.renders[sel].float())  # (B, V, F, C0, h, w)
        lat = pool.ref_latents[idx]
        tokens = m.image_embedder(lat)
        hidden = m.reference_unet(lat, tokens)  # unprojected: each UNet projects it with its own K/V
        ctx = ReferenceContext(lat, tokens, m.image_embedder.null(lat.shape[0]).to(tokens.dtype),
                               m.unet.build_reference_cache(hidden))
        return x0, (feats, ctx, hidden)

    @torch.no_grad()
    def teacher(self, x_t, t, cond):
        feats, ctx, _ = cond
        return self.model.denoise(x_t, t, feats, ctx, guidance=self.guidance)

    def run(self, net, x_t, t, cond):
        feats, ctx, hidden = cond
        return net(x_t, t, ctx.image_tokens, feats, net.build_reference_cache(hidden))


def export_stage2_student(task: Stage2Task, out_dir: str | Path, teacher_dir: str | Path, *, dc: DistillConfig,
                          extra: dict | None = None) -> Path:
    """Write a stage-2 student folder: ``model.safetensors`` (the EMA target UNet, ``unet.*`` keys, fp16)
    + ``config.json`` (teacher config with guidance 1.0 and the ``distill`` object)."""
    import os

    from mvportrait.models.stage2 import CHECKPOINT_FORMAT, CONFIG_FILE, WEIGHTS_FILE

    out_dir = Path(out_dir)
    state = {f"unet.{k}": v.detach().to("cpu", torch.float16).contiguous()
             for k, v in task.target.state_dict().items()}
    rel = os.path.relpath(Path(teacher_dir).resolve(), out_dir.resolve())
    info = {"sampler": "consistency", "guidance": task.guidance, "teacher": rel, "default_steps": dc.default_steps,
            "method": "latent consistency distillation (LCM)", "trained": "unet",
            "stored_params": int(sum(v.numel() for v in state.values())),
            "solver": f"DDIM, trailing {grid_size(task.schedule.num_train_timesteps, dc.skip)}-step grid, skip {dc.skip}",
            "target_ema": dc.target_ema, "loss": dc.loss, "train_clip": {"views": dc.views, "frames": dc.frames}}
    meta = {"format": CHECKPOINT_FORMAT, "dtype": "float16", "config": task.model.config.replace(guidance=1.0).to_dict(),
            **(extra or {}), "distill": info}
    return write_checkpoint(out_dir, state, meta, CONFIG_FILE, WEIGHTS_FILE)


def distill_stage2(out: str | Path, *, teacher_dir=None, export_dir=None, device="cpu", seed: int = 0,
                   resume: bool = False, overrides: dict | None = None, time_budget_s: float | None = None,
                   on_phase: Callable[[str, int], Callable] | None = None, command: str | None = None,
                   model=None) -> dict:
    """Distil the stage-2 teacher folder (default: the shipped one) into ``export_dir`` (default
    ``OUT/student``); the run lives in ``OUT/unet``. ``model`` replaces the teacher (tests)."""
    from mvportrait.engine.flame2video import DEFAULT_WEIGHTS
    from mvportrait.models.stage2 import FLAME2VideoModel
    from mvportrait.models.students import distill_info
    from mvportrait.train.stage2 import ClipPool

    out = Path(out)
    teacher_dir = Path(teacher_dir) if teacher_dir is not None else DEFAULT_WEIGHTS
    export_dir = Path(export_dir) if export_dir is not None else out / "student"
    dev = torch.device(device)
    enable_tf32(dev)
    dc = DEFAULTS["stage2"].replace(**(overrides or {}))
    if model is None:
        meta = json.loads((teacher_dir / "config.json").read_text()) if (teacher_dir / "config.json").is_file() else {}
        if distill_info(meta) is not None:
            raise ValueError(f"{teacher_dir} is a student; distil from a teacher")
        model = FLAME2VideoModel.from_pretrained(teacher_dir, device=dev, dtype=torch.float32)
    cfg = model.config
    if dc.views > cfg.views or dc.frames > cfg.frames:
        raise ValueError(f"training clips of {dc.views} views x {dc.frames} frames exceed the corpus clips "
                         f"({cfg.views} x {cfg.frames})")
    upd = on_phase("render training clips", dc.pool_size) if on_phase else None
    t0 = time.perf_counter()
    pool = ClipPool.build(cfg, dc.pool_size, dc.pool_seed, dev, frame_stride=dc.frame_stride,
                          on_progress=(lambda k: upd(k, {})) if upd else None)
    pool.encode_latents(model.autoencoder.eval())
    data_s = time.perf_counter() - t0
    task = Stage2Task(model, pool, dc)
    res = _run(task, dc, out / "unet", seed, resume, None if time_budget_s is None else time_budget_s - data_s,
               on_phase, "distil stage-2 UNet")
    res["data_s"] = round(data_s, 1)
    extra = {"seed": seed, "device": str(dev), "command": command,
             "corpus": {"split": "train", "pool_size": dc.pool_size, "pool_seed": dc.pool_seed,
                        "frame_stride": dc.frame_stride},
             "distill_run": {k: res[k] for k in ("steps", "wall_s", "stopped_by", "final_loss")},
             "distill_recipe": dc.to_dict()}
    export_stage2_student(task, export_dir, teacher_dir, dc=dc, extra=extra)
    _copy_fps(teacher_dir, export_dir)
    res["export"] = str(export_dir)
    return res


# ------------------------------------------------------------------------- export from a run
def _restore_target(target: torch.nn.Module, run_dir: Path) -> dict:
    """Load the EMA target weights of a run's checkpoint into ``target``; returns checkpoint.json."""
    run_dir = Path(run_dir)
    ckpt, meta_path = run_dir / "checkpoint.safetensors", run_dir / "checkpoint.json"
    if not ckpt.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"no distillation checkpoint in {run_dir} (checkpoint.safetensors + checkpoint.json)")
    meta = json.loads(meta_path.read_text())
    tensors = {k[len("target."):]: v for k, v in load_file(str(ckpt)).items() if k.startswith("target.")}
    from mvportrait.models.students import overlay

    overlay(target, tensors, ckpt)
    meta["trained_names"] = sorted(tensors)
    rows = [json.loads(line) for line in (run_dir / "loss.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "loss.jsonl").is_file() else []
    meta["final_loss"] = rows[-1] if rows else None
    return meta


def export_stage1_checkpoint(run_dir, path_stem, teacher_stem, *, command: str | None = None) -> tuple[Path, Path]:
    """Export a stage-1 student from a run's checkpoint (``OUT/<kind>``) without training."""
    import copy
    from types import SimpleNamespace

    from mvportrait.models.students import load_stage1
    from mvportrait.train.stage1 import make_schedule

    teacher, tmeta = load_stage1(teacher_stem)
    target = copy.deepcopy(teacher)
    meta = _restore_target(target, run_dir)
    dc = DistillConfig(**meta["distill"])
    named = dict(target.named_parameters())
    task = SimpleNamespace(name=meta["task"], teacher_model=teacher, target=target, schedule=make_schedule(teacher.cfg),
                           guidance=float(meta["guidance"]), trained=[(n, named[n]) for n in meta["trained_names"]])
    extra = {"text_encoder": tmeta.get("text_encoder"), "preset": tmeta.get("preset"), "seed": meta["seed"],
             "params": teacher.num_parameters(),
             "corpus": {"seed": dc.corpus_seed, "size": dc.corpus_size, "split": "train",
                        "captions_per_clip": dc.captions_per_clip},
             "distill_run": {"steps": meta["step"], "final_loss": meta["final_loss"]}, "distill_recipe": dc.to_dict(),
             "export_command": command}
    return export_stage1_student(task, path_stem, teacher_stem, dc=dc, extra=extra)


def export_stage2_checkpoint(run_dir, export_dir, teacher_dir, *, command: str | None = None) -> Path:
    """Export a stage-2 student from a run's checkpoint (``OUT/unet``) without training."""
    import copy
    from types import SimpleNamespace

    from mvportrait.models.stage2 import FLAME2VideoModel

    model = FLAME2VideoModel.from_pretrained(teacher_dir, dtype=torch.float32)
    target = copy.deepcopy(model.unet)
    meta = _restore_target(target, run_dir)
    dc = DistillConfig(**meta["distill"])
    cfg = model.config
    task = SimpleNamespace(target=target, model=model, guidance=float(meta["guidance"]),
                           schedule=NoiseSchedule.from_kind(cfg.beta_schedule, cfg.train_timesteps))
    extra = {"seed": meta["seed"], "export_command": command,
             "corpus": {"split": "train", "pool_size": dc.pool_size, "pool_seed": dc.pool_seed,
                        "frame_stride": dc.frame_stride},
             "distill_run": {"steps": meta["step"], "final_loss": meta["final_loss"]}, "distill_recipe": dc.to_dict()}
    out = export_stage2_student(task, export_dir, teacher_dir, dc=dc, extra=extra)
    _copy_fps(Path(teacher_dir), Path(export_dir))
    return out


def _copy_fps(teacher_dir: Path, export_dir: Path) -> None:
    """The student folder's ``train_summary.json`` carries the teacher's frame rate (the pipeline reads it)."""
    src = teacher_dir / "train_summary.json"
    if src.is_file():
        fps = json.loads(src.read_text()).get("fps")
        atomic_write(export_dir / "train_summary.json", lambda tmp: Path(tmp).write_text(
            json.dumps({"fps": fps, "note": "frame rate of the teacher; its training summary is in the teacher folder"},
                       indent=1) + "\n"))


__all__ = ["DistillConfig", "DEFAULTS", "DistillTask", "Stage1Task", "Stage2Task", "distill", "distill_stage1",
           "distill_stage2", "consistency_loss", "teacher_target", "solver_timesteps", "distance",
           "export_stage1_student", "export_stage2_student", "export_stage1_checkpoint",
           "export_stage2_checkpoint", "lr_at", "LOSSES", "SUBSETS"]
