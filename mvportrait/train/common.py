"""Pieces shared by the training and distillation recipes: AdamW state as plain tensors.

Checkpoints store optimizer state in safetensors (nothing is ever unpickled): for every trained
parameter ``name`` the keys ``opt.<name>.exp_avg``, ``opt.<name>.exp_avg_sq`` and ``opt.<name>.step``
(a (1,) float32 tensor). ``names`` lists the parameters in the order of the optimizer's first group.
"""
from __future__ import annotations

import time

import torch

__all__ = ["optimizer_tensors", "load_optimizer", "optimizer_step", "enable_tf32", "StepBudget"]


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


class StepBudget:
    """Fits a training loop's step count to a wall-clock budget from its measured step rate.

    The rate is measured from the 5th step after ``start`` (the first steps pay one-time costs) and
    re-measured every 20 steps (it changes with the load of a shared machine). :meth:`fit` returns the
    step count that fits what is left of the budget, never above ``max_steps`` nor below the current
    step, or None when there is no new measurement yet.
    """

    def __init__(self, budget_s: float, start: int, max_steps: int):
        self.budget_s, self.start, self.max_steps = budget_s, start, max_steps
        self.t0 = time.perf_counter()
        self.mark: tuple[int, float] | None = None  # (step, time) where the current measurement started
        self.rate: float | None = None  # seconds per step of the last measurement

    def fit(self, step: int) -> int | None:
        now = time.perf_counter()
        if self.mark is None:
            if step - self.start >= 5:
                self.mark = (step, now)
            return None
        if step - self.mark[0] < 20:
            return None
        self.rate = (now - self.mark[1]) / (step - self.mark[0])
        self.mark = (step, now)
        left = max(0.0, self.budget_s - (now - self.t0))
        return max(1, step, min(self.max_steps, int(step + left / self.rate)))

    def spent(self) -> bool:
        """Whether the whole budget has passed."""
        return time.perf_counter() - self.t0 >= self.budget_s
