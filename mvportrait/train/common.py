"""Pieces shared by the training and distillation recipes: AdamW state as plain tensors.

Checkpoints store optimizer state in safetensors (nothing is ever unpickled): for every trained
parameter ``name`` the keys ``opt.<name>.exp_avg``, ``opt.<name>.exp_avg_sq`` and ``opt.<name>.step``
(a (1,) float32 tensor). ``names`` lists the parameters in the order of the optimizer's first group.
"""
from __future__ import annotations

import torch

__all__ = ["optimizer_tensors", "load_optimizer"]


def enable_tf32(device: torch.device) -> None:
    """Training on CUDA: float32 matrix products and convolutions on the tensor cores (TF32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """AdamW state of the first parameter group as ``opt.<name>.*`` tensors (parameters without state skipped)."""
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


def load_optimizer(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_tensors` (parameters missing from ``tensors`` keep a fresh state)."""
    params = opt.param_groups[0]["params"]
    for name, p in zip(names, params):
        key = f"opt.{name}.exp_avg"
        if key not in tensors:
            continue
        opt.state[p] = {"exp_avg": tensors[key].clone(), "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].clone(),
                        "step": tensors[f"opt.{name}.step"].reshape(()).cpu().clone()}  # AdamW keeps steps on the CPU


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, lr: float, grad_clip: float) -> None:
    """One update: set every group's learning rate, backward, clip the gradient norm (when > 0), step."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
