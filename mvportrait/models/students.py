"""Distilled (consistency) students: stored as the tensors that differ from their teacher.

A student checkpoint is a teacher checkpoint's JSON with a ``"distill"`` object and a weights file
that holds only the tensors the distillation trained (fp16); every other tensor comes from the
teacher it names. The ``"distill"`` object (the contract the pipelines read)::

    {"sampler": "consistency",       # sample with engine.schedulers.ConsistencySampler
     "guidance": 2.5,                # the teacher guidance folded into the student (sample at 1.0)
     "teacher": "motion",            # teacher path relative to the student's folder
     "default_steps": 2,             # the pipelines' default step count for this student
     "trained": "all" | "no-ff" | "unet", ...}  # which tensors were trained (recipe details)

The student's own ``config`` equals the teacher's except ``guidance`` = 1.0 (folded), so a pipeline
that defaults to ``config.guidance`` runs the student without classifier-free guidance.

Stage 1 (MotionDM / EmotionDM): ``<name>.json`` + ``<name>.safetensors`` (stem paths, as the
teachers); :func:`load_stage1` loads either. Stage 2: a folder with ``config.json`` and
``model.safetensors`` holding the ``unet.*`` tensors; ``FLAME2VideoModel.from_pretrained`` loads it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["DISTILL_KEY", "distill_info", "teacher_path", "overlay", "load_stage1", "STAGE1_FORMAT"]

DISTILL_KEY = "distill"
STAGE1_FORMAT = 1
_REQUIRED = {"sampler": str, "guidance": (int, float), "teacher": str, "default_steps": int}


def distill_info(meta: dict, source: str | Path = "<meta>") -> dict | None:
    """The checked ``"distill"`` object of a checkpoint's JSON, or None for a teacher."""
    info = meta.get(DISTILL_KEY) if isinstance(meta, dict) else None
    if info is None:
        return None
    if not isinstance(info, dict):
        raise ValueError(f"{source}: '{DISTILL_KEY}' must be an object, got {type(info).__name__}")
    for key, typ in _REQUIRED.items():
        if not isinstance(info.get(key), typ) or isinstance(info.get(key), bool):
            raise ValueError(f"{source}: '{DISTILL_KEY}.{key}' is missing or not a {getattr(typ, '__name__', typ)}")
    if info["sampler"] != "consistency":
        raise ValueError(f"{source}: unknown student sampler {info['sampler']!r}; expected 'consistency'")
    if not 1 <= info["default_steps"] <= 1000:
        raise ValueError(f"{source}: '{DISTILL_KEY}.default_steps' must be in [1, 1000], got {info['default_steps']}")
    return info


def teacher_path(student_dir: str | Path, info: dict) -> Path:
    """The teacher a student names, resolved against the student's folder."""
    p = Path(info["teacher"])
    return p if p.is_absolute() else (Path(student_dir) / p)


def overlay(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy a student's stored tensors into a teacher-initialised ``model`` (names and shapes checked)."""
    state = model.state_dict()
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} tensors are not in the teacher's model: {unknown[:5]}")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(state[k].shape)}" for k, v in tensors.items()
           if tuple(v.shape) != tuple(state[k].shape)]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensors do not fit the teacher's shapes: {bad[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(v.to(state[k].dtype))


def _same_but_guidance(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "guidance"} == {k: v for k, v in b.items() if k != "guidance"}


def load_stage1(path_stem: str | Path):
    """(MotionDenoiser in float32, eval mode; its JSON metadata) from ``<stem>.json`` +
    ``<stem>.safetensors``: a teacher as written by ``train.stage1.export_weights``, or a student
    (only its trained tensors stored; the rest read from the teacher stem it names)."""
    from safetensors.torch import load_file

    from mvportrait.config import DenoiserConfig
    from mvportrait.models.motion_denoiser import MotionDenoiser

    path_stem = Path(path_stem)
    w, j = path_stem.with_suffix(".safetensors"), path_stem.with_suffix(".json")
    for p in (w, j):
        if not p.is_file():
            raise FileNotFoundError(f"stage-1 weights file {p} is missing")
    try:
        meta = json.loads(j.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{j} is not valid JSON: {e}") from e
    if meta.get("format") != STAGE1_FORMAT:
        raise ValueError(f"{j} has weights format {meta.get('format')}, expected {STAGE1_FORMAT}")
    info = distill_info(meta, j)
    cfg = DenoiserConfig.from_dict(meta["config"])
    if info is None:
        model = MotionDenoiser(cfg)
        model.load_state_dict({k: v.float() for k, v in load_file(str(w)).items()})
        return model.eval(), meta
    teacher_stem = teacher_path(path_stem.parent, info)
    if teacher_stem.resolve() == path_stem.resolve():
        raise ValueError(f"{j}: a student cannot be its own teacher")
    model, tmeta = load_stage1(teacher_stem)
    if distill_info(tmeta) is not None:
        raise ValueError(f"{j}: teacher {teacher_stem} is itself a student")
    if not _same_but_guidance(tmeta["config"], meta["config"]):
        raise ValueError(f"{j}: the student's config differs from its teacher's ({teacher_stem}) beyond guidance")
    overlay(model, {k: v.float() for k, v in load_file(str(w)).items()}, w)
    model.cfg = cfg  # the teacher's network with the folded guidance (1.0) as the default
    return model.eval(), meta
