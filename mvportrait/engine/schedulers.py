"""Noise schedules and samplers (DDIM, DDPM) shared by stage 1 (motion / emotion DMs) and stage 2.

Math (DDPM, Ho et al. 2020; DDIM, Song et al. 2021). With ``a_t = alphas_cumprod[t]``::

    forward      x_t  = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    velocity     v    = sqrt(a_t) eps - sqrt(1 - a_t) x0
    from eps     x0   = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    from v       x0   = sqrt(a_t) x_t - sqrt(1 - a_t) v,   eps = sqrt(a_t) v + sqrt(1 - a_t) x_t
    DDIM         sigma  = eta sqrt((1 - a_p) / (1 - a_t)) sqrt(1 - a_t / a_p)
                 x_p    = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma z
    DDPM         b      = 1 - a_t / a_p   (beta of the jump t -> p)
                 x_p    = sqrt(a_p) b / (1 - a_t) x0 + sqrt(1 - b) (1 - a_p) / (1 - a_t) x_t + s z
                 s^2    = (1 - a_p) / (1 - a_t) b  ("fixed_small")  or  b  ("fixed_large")

Consistency models (LCM, Luo et al. 2023) predict x0 directly through the boundary condition::

    c_skip = sd^2 / ((s t)^2 + sd^2),  c_out = s t / sqrt((s t)^2 + sd^2)   (sd = 0.5, s = 10)
    f(x_t, t) = c_skip x_t + c_out x0_pred(model output)     (f = x_t at t = 0)
    multistep    x_p = sqrt(a_p) f(x_t, t) + sqrt(1 - a_p) z   (fresh z; x_p = f past the last step)

``p`` is the previous (less noisy) timestep; ``p < 0`` means "past the end": DDIM uses the final
alpha (1 with ``set_alpha_to_one``, else ``a_0``), DDPM uses 1 and adds no noise.

Timestep spacing for ``n`` steps out of ``T`` training steps (the names of diffusers' DDIM config;
Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", Table 2):

=========  ====================================================  ======================
spacing    timesteps (descending)                                 first / last (T=1000)
=========  ====================================================  ======================
leading    ``i * (T // n) + steps_offset``, i = n-1 .. 0         SD: offset 1 -> 901..1
trailing   ``round(T - i * T / n) - 1``, i = 0 .. n-1            999 .. >= 0
linspace   ``round(linspace(0, T - 1, n))`` reversed             999 .. 0 (n=1: only 0)
=========  ====================================================  ======================

Rounding is half-to-even (numpy / Python ``round``). "trailing" starts at ``T - 1`` and suits
few-step and distilled models. The DDIM "previous timestep" is by default the next entry of the
list (``prev_rule="next"``, the DDIM paper's subsequence). diffusers' ``DDIMScheduler`` instead
always jumps by ``T // n`` (``prev_rule="fixed_stride"``); the two agree for "leading" spacing
(and "trailing" when ``n`` divides ``T``) and differ for "linspace". Use "fixed_stride" to
reproduce diffusers pipelines bit for bit (AnimateDiff's config uses "linspace").

Tables are float64 on the CPU; scalar timesteps turn into Python floats (no device sync),
per-sample timestep tensors gather from a per-device copy. Updates run in the input's dtype, or
float32 for half / bfloat16 inputs, and come back in the input's dtype.

Value checks that would force a device sync (NaN scans, timestep-tensor range checks on GPU) are
kept out of ``step`` / ``add_noise``; ``sample`` checks its inputs once before the loop, its result
once after it, and every model output only with ``check_finite=True``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import torch

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "make_betas",
    "NoiseSchedule",
    "spaced_timesteps",
    "combine_guidance",
    "StepOutput",
    "DDIMSampler",
    "DDPMSampler",
    "ConsistencySampler",
    "consistency_boundary",
    "consistency_x0",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
_PREV_RULES = ("next", "fixed_stride")
_VARIANCE_TYPES = ("fixed_small", "fixed_large")

# ----------------------------------------------------------------------------------------------
# small checks


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def _check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")
    return value


def _check_finite_tensor(name: str, x: torch.Tensor) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got dtype {x.dtype}")
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


# ----------------------------------------------------------------------------------------------
# noise schedules


def make_betas(
    kind: str,
    num_train_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    *,
    max_beta: float = 0.999,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Betas (num_train_timesteps,) of a named schedule.

    - ``"linear"``: ``linspace(beta_start, beta_end, T)`` (DDPM; default 1e-4 .. 0.02).
    - ``"scaled_linear"``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` (Stable
      Diffusion uses beta_start=0.00085, beta_end=0.012; defaults are 1e-4 .. 0.02 as for linear).
    - ``"cosine"``: Nichol & Dhariwal, ``abar(s) = cos((s + 0.008) / 1.008 * pi / 2) ** 2``,
      ``beta_i = min(1 - abar((i + 1) / T) / abar(i / T), max_beta)`` (diffusers'
      "squaredcos_cap_v2"); it takes no beta_start / beta_end.

    ``dtype`` is the precision the linspace runs in (float32 reproduces diffusers' tables exactly).
    """
    _check_choice("beta schedule", kind, BETA_SCHEDULES)
    n = _check_int("num_train_timesteps", num_train_timesteps, 1)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule takes no beta_start / beta_end (it uses max_beta)")
        max_beta = _check_float("max_beta", max_beta, 0.0, 1.0)

        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1.0 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
        return torch.tensor(betas, dtype=dtype)
    b0 = _check_float("beta_start", 1e-4 if beta_start is None else beta_start)
    b1 = _check_float("beta_end", 0.02 if beta_end is None else beta_end)
    if not 0.0 < b0 <= b1 < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={b0}, beta_end={b1}")
    if kind == "linear":
        return torch.linspace(b0, b1, n, dtype=dtype)
    return torch.linspace(b0**0.5, b1**0.5, n, dtype=dtype) ** 2


def _split_prediction(kind: str, out: torch.Tensor, x_t: torch.Tensor, sa, sb):
    """(x0, eps) from a model output of ``kind``; ``sa = sqrt(a_t)``, ``sb = sqrt(1 - a_t)``."""
    if kind == "epsilon":
        return (x_t - sb * out) / sa, out
    if kind == "sample":
        return out, (x_t - sa * out) / sb
    if kind == "v_prediction":
        return sa * x_t - sb * out, sa * out + sb * x_t
    raise ValueError(f"unknown prediction type {kind!r}; expected one of {', '.join(PREDICTION_TYPES)}")


class NoiseSchedule:
    """Discrete DDPM noise schedule: ``betas``, ``alphas``, ``alphas_cumprod`` (float64, CPU).

    Methods take ``t`` as an int (same timestep for the whole batch) or an integer tensor of shape
    () or (B,) with ``B = x.shape[0]`` (one timestep per sample); coefficients broadcast over the
    remaining dims. Results have the dtype of the first tensor argument. Treat the tables as
    read-only.
    """

    def __init__(self, betas: torch.Tensor | Sequence[float]):
        betas = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float64).clone()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(torch.isfinite(betas).all()):
            raise ValueError("betas contain NaN or infinite values")
        if bool((betas <= 0).any()) or bool((betas >= 1).any()):
            raise ValueError("betas must lie in the open interval (0, 1)")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._ac_list = self.alphas_cumprod.tolist()
        self._device_tables: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_kind(
        cls,
        kind: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        **kwargs,
    ) -> "NoiseSchedule":
        """``NoiseSchedule(make_betas(...))``; see :func:`make_betas`."""
        return cls(make_betas(kind, num_train_timesteps, beta_start, beta_end, **kwargs))

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_train_timesteps}, beta[0]={self.betas[0].item():.6g}, "
                f"beta[-1]={self.betas[-1].item():.6g})")

    # -- timestep handling -------------------------------------------------------------------

    def _alpha_bar(self, t, x: torch.Tensor, prev: bool = False, final: float = 1.0):
        """a_t as a Python float (int t) or a (B, 1, ..) tensor in ``x``'s compute dtype.

        With ``prev=True`` negative timesteps mean "past the end" and give ``final``.
        """
        T = self.num_train_timesteps
        if isinstance(t, torch.Tensor) and t.ndim == 0 and t.device.type == "cpu":
            t = int(t)
        if isinstance(t, numbers.Integral) and not isinstance(t, bool):
            t = int(t)
            if t >= T or (t < 0 and not prev):
                raise ValueError(f"timestep {t} is outside [0, {T - 1}]")
            return final if t < 0 else self._ac_list[t]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"timestep must be an int or an integer tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"timestep tensors must have an integer dtype, got {t.dtype}")
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
            raise ValueError(f"timestep tensor must have shape () or ({x.shape[0]},) to match the batch, "
                             f"got {tuple(t.shape)}")
        if t.device.type == "cpu" and t.numel():
            lo, hi = int(t.min()), int(t.max())
            if hi >= T or (lo < 0 and not prev):
                raise ValueError(f"timesteps must lie in [0, {T - 1}], got range [{lo}, {hi}]")
        table = self._device_tables.get(x.device)
        if table is None:
            dt = torch.float32 if x.device.type == "mps" else torch.float64
            table = self.alphas_cumprod.to(device=x.device, dtype=dt)
            self._device_tables[x.device] = table
        t = t.to(device=x.device, dtype=torch.long)
        a = table[t.clamp(min=0)]
        if prev:
            a = torch.where(t >= 0, a, torch.full_like(a, final))
        return a.to(_compute_dtype(x)).reshape(-1, *([1] * (x.ndim - 1)))

    def _sa_sb(self, t, x: torch.Tensor):
        a = self._alpha_bar(t, x)
        return a**0.5, (1.0 - a) ** 0.5

    @staticmethod
    def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
        if a.shape != b.shape:
            raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} "
                             f"and {tuple(b.shape)}")
        if a.ndim == 0:
            raise ValueError(f"{name_a} must have a batch dimension")

    def _lin(self, ca, a: torch.Tensor, cb, b: torch.Tensor) -> torch.Tensor:
        cd = _compute_dtype(a)
        return (ca * a.to(cd) + cb * b.to(cd)).to(a.dtype)

    # -- forward process and conversions -----------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """q(x_t | x_0): ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
        self._check_pair("x0", x0, "noise", noise)
        sa, sb = self._sa_sb(t, x0)
        return self._lin(sa, x0, sb, noise)

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """v-prediction target ``sqrt(a_t) noise - sqrt(1 - a_t) x0``."""
        self._check_pair("x0", x0, "noise", noise)
        sa, sb = self._sa_sb(t, x0)
        return self._lin(sa, noise, -sb, x0)

    def pred_x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        self._check_pair("x_t", x_t, "eps", eps)
        sa, sb = self._sa_sb(t, x_t)
        return self._lin(1.0 / sa, x_t, -sb / sa, eps)

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        self._check_pair("x_t", x_t, "x0", x0)
        sa, sb = self._sa_sb(t, x_t)
        return self._lin(1.0 / sb, x_t, -sa / sb, x0)

    def pred_x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        self._check_pair("x_t", x_t, "v", v)
        sa, sb = self._sa_sb(t, x_t)
        return self._lin(sa, x_t, -sb, v)

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        self._check_pair("x_t", x_t, "v", v)
        sa, sb = self._sa_sb(t, x_t)
        return self._lin(sb, x_t, sa, v)

    def split_prediction(self, kind: str, model_output: torch.Tensor, x_t: torch.Tensor, t):
        """(pred_x0, pred_eps) from a model output of ``kind`` (epsilon | sample | v_prediction)."""
        _check_choice("prediction type", kind, PREDICTION_TYPES)
        self._check_pair("model_output", model_output, "x_t", x_t)
        sa, sb = self._sa_sb(t, x_t)
        cd = _compute_dtype(x_t)
        x0, eps = _split_prediction(kind, model_output.to(cd), x_t.to(cd), sa, sb)
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    def training_target(self, kind: str, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What a model of prediction type ``kind`` should output for ``add_noise(x0, noise, t)``."""
        _check_choice("prediction type", kind, PREDICTION_TYPES)
        self._check_pair("x0", x0, "noise", noise)
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return x0
        return self.velocity(x0, noise, t)

    def snr(self, t) -> float | torch.Tensor:
        """Signal-to-noise ratio ``a_t / (1 - a_t)``: a float for an int t, else a float64 tensor."""
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            a = self._alpha_bar(t, torch.empty(t.shape[0], dtype=torch.float64)).reshape(-1)
        else:
            a = self._alpha_bar(t, self.alphas_cumprod)
        return a / (1.0 - a)


# ----------------------------------------------------------------------------------------------
# timesteps and guidance


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading",
                     steps_offset: int = 0) -> torch.Tensor:
    """Descending int64 timesteps for ``steps`` sampling steps (see the module docstring)."""
    T = _check_int("num_train_timesteps", num_train_timesteps, 1)
    n = _check_int("steps", steps, 1, T)
    _check_choice("timestep spacing", spacing, TIMESTEP_SPACINGS)
    off = _check_int("steps_offset", steps_offset, 0)
    if off and spacing != "leading":
        raise ValueError(f"steps_offset only applies to 'leading' spacing, got spacing={spacing!r}")
    if spacing == "leading":
        ratio = T // n
        ts = [i * ratio + off for i in range(n - 1, -1, -1)]
        if ts[0] >= T:
            raise ValueError(f"steps_offset={off} with {n} leading-spaced steps gives timestep {ts[0]} "
                             f">= num_train_timesteps={T}; lower steps_offset or steps")
    elif spacing == "trailing":
        # T + i * delta with delta = (T - T / n) - T, as numpy's float arange fills it, so that the
        # rounding at exact halves matches diffusers' timesteps
        delta = (T - T / n) - T
        ts = [round(T + i * delta) - 1 for i in range(n)]
    else:
        step = (T - 1) / (n - 1) if n > 1 else 0.0
        ts = [T - 1 if i == n - 1 and n > 1 else round(i * step) for i in range(n - 1, -1, -1)]
    return torch.tensor(ts, dtype=torch.int64)


def combine_guidance(out_uncond: torch.Tensor, out_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
    if out_uncond.shape != out_cond.shape:
        raise ValueError(f"cond and uncond outputs differ in shape: {tuple(out_cond.shape)} vs "
                         f"{tuple(out_uncond.shape)}")
    return out_uncond + scale * (out_cond - out_uncond)


def _cat_cond(uncond: Any, cond: Any, batch: int, path: str = "cond") -> Any:
    """Concatenate [uncond, cond] along dim 0 through tensors / dicts / lists / tuples."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise TypeError(f"{path}: cond is a tensor but uncond is {type(uncond).__name__}")
        parts = []
        for name, v in (("uncond", uncond), ("cond", cond)):
            if v.ndim == 0:
                raise ValueError(f"{path}: {name} tensors need a batch dimension for guidance")
            if v.shape[0] == 1 and batch > 1:
                v = v.expand(batch, *v.shape[1:])
            elif v.shape[0] != batch:
                raise ValueError(f"{path}: {name} has batch {v.shape[0]}, expected {batch} (or 1)")
            parts.append(v)
        if parts[0].shape[1:] != parts[1].shape[1:]:
            raise ValueError(f"{path}: cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} "
                             "differ beyond the batch dimension")
        return torch.cat(parts, dim=0)
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or set(cond) != set(uncond):
            raise ValueError(f"{path}: cond and uncond must be dicts with the same keys")
        return {k: _cat_cond(uncond[k], v, batch, f"{path}[{k!r}]") for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        if type(uncond) is not type(cond) or len(uncond) != len(cond):
            raise ValueError(f"{path}: cond and uncond must be {type(cond).__name__}s of equal length")
        return type(cond)(_cat_cond(u, c, batch, f"{path}[{i}]") for i, (u, c) in enumerate(zip(uncond, cond)))
    if cond is None and uncond is None:
        return None
    if isinstance(uncond, torch.Tensor) or uncond != cond:
        raise ValueError(f"{path}: non-tensor entries must be equal in cond and uncond, got {cond!r} "
                         f"and {uncond!r}")
    return cond


def _randn(shape, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype):
    """Gaussian noise drawn on the generator's device, then moved (same seed -> same noise anywhere)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor          # x at the previous (less noisy) timestep
    pred_original_sample: torch.Tensor  # the model's x0 estimate at this step


# ----------------------------------------------------------------------------------------------
# samplers


class _Sampler:
    """Shared configuration, x0 post-processing and the sampling loop."""

    def __init__(self, schedule: NoiseSchedule, *, prediction_type: str, timestep_spacing: str,
                 steps_offset: int, clip_sample: bool, clip_sample_range: float, thresholding: bool,
                 dynamic_thresholding_ratio: float, sample_max_value: float):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.prediction_type = _check_choice("prediction type", prediction_type, PREDICTION_TYPES)
        self.timestep_spacing = _check_choice("timestep spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.steps_offset = _check_int("steps_offset", steps_offset, 0, schedule.num_train_timesteps - 1)
        if clip_sample and thresholding:
            raise ValueError("choose at most one of clip_sample and thresholding")
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = _check_float("clip_sample_range", clip_sample_range, 0.0)
        self.thresholding = bool(thresholding)
        self.dynamic_thresholding_ratio = _check_float("dynamic_thresholding_ratio",
                                                       dynamic_thresholding_ratio, 0.0, 1.0)
        self.sample_max_value = _check_float("sample_max_value", sample_max_value, 1.0)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def timesteps(self, steps: int) -> torch.Tensor:
        """Descending int64 CPU tensor of the timesteps visited with ``steps`` steps."""
        return spaced_timesteps(self.num_train_timesteps, steps, self.timestep_spacing,
                                self.steps_offset if self.timestep_spacing == "leading" else 0)

    def timestep_pairs(self, steps: int | None = None,
                       timesteps: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """[(t, prev_t), ...] for the loop; ``prev_t = -1`` past the last step."""
        if (steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of steps and timesteps")
        if timesteps is not None:
            ts = [int(v) for v in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
            if not ts:
                raise ValueError("timesteps must not be empty")
            T = self.num_train_timesteps
            if any(not 0 <= v < T for v in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError(f"timesteps must be strictly descending in [0, {T - 1}], got {ts}")
            return list(zip(ts, ts[1:] + [-1]))
        ts = self.timesteps(steps).tolist()
        return list(zip(ts, self._prev_list(ts, steps)))

    def _prev_list(self, ts: list[int], steps: int) -> list[int]:
        return ts[1:] + [-1]

    def _process_x0(self, x0: torch.Tensor) -> torch.Tensor:
        if self.clip_sample:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        if self.thresholding:
            # Imagen dynamic thresholding: per sample, s = quantile(|x0|, ratio) clamped to
            # [1, sample_max_value]; x0 <- clamp(x0, -s, s) / s.
            flat = x0.reshape(x0.shape[0], -1)
            s = torch.quantile(flat.abs(), self.dynamic_thresholding_ratio, dim=1)
            s = s.clamp(min=1.0, max=self.sample_max_value).unsqueeze(1)
            return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)
        return x0

    def _check_step_args(self, model_output: torch.Tensor, x_t: torch.Tensor) -> torch.dtype:
        if not isinstance(model_output, torch.Tensor) or not isinstance(x_t, torch.Tensor):
            raise TypeError("model_output and x_t must be tensors")
        if model_output.shape != x_t.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} must equal x_t shape "
                             f"{tuple(x_t.shape)}")
        if x_t.ndim == 0:
            raise ValueError("x_t must have a batch dimension")
        return _compute_dtype(x_t)

    def step(self, model_output, t, x_t, *, prev_t, generator=None, noise=None) -> StepOutput:
        raise NotImplementedError

    def sample(
        self,
        denoise_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
        shape: Sequence[int],
        *,
        steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        guidance_scale: float = 1.0,
        cond: Any = None,
        uncond: Any = None,
        x_T: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        check_finite: bool = False,
    ) -> torch.Tensor:
        """Run the reverse process from noise and return x0 of ``shape``.

        ``denoise_fn(x_t, t, cond) -> model_output`` gets ``t`` as an int64 tensor (batch,) on the
        sample's device. With ``guidance_scale == 1`` it is called once per step on ``cond``
        (``uncond`` is ignored). Otherwise it is called once on the batch ``[uncond; cond]``
        (x_t repeated, conditions concatenated along dim 0 through tensors / dicts / lists /
        tuples; batch-1 entries are expanded) and the halves are combined as
        ``uncond + s * (cond - uncond)``.

        ``x_T`` (default: ``randn`` from ``generator``, drawn on the generator's device) sets the
        start; it also fixes device and dtype unless given (else the generator's device, or CPU,
        and float32). All noise is drawn on the generator's device and moved, so one CPU seed gives
        the same noise on every device; a generator on the sample's device avoids the copies. ``timesteps`` replaces ``steps`` with an
        explicit strictly descending list (e.g. a distilled model's).

        Inpainting hook: ``known`` (x0-space values) and ``known_mask`` (1 = known, values in
        [0, 1]), both broadcastable to ``shape``. The known part is noised to the first timestep
        in x_T, re-imposed after each step noised to ``prev_t`` (fresh noise from ``generator``),
        and set exactly to ``known`` after the last step. Used to continue a sequence from the last
        frames of the previous window.

        ``callback(i, t, x_prev, pred_x0)`` runs after each step. Same generator seed, same
        inputs, same backend -> bitwise the same output.
        """
        if not callable(denoise_fn):
            raise TypeError("denoise_fn must be callable as denoise_fn(x_t, t, cond)")
        shape = tuple(_check_int("shape entry", s, 1) for s in shape)
        if not shape:
            raise ValueError("shape must have at least a batch dimension")
        scale = _check_float("guidance_scale", guidance_scale)
        use_cfg = scale != 1.0
        if use_cfg and (cond is None or uncond is None):
            raise ValueError(f"guidance_scale={scale} needs both cond and uncond (or use guidance_scale=1)")
        pairs = self.timestep_pairs(steps, timesteps)

        if x_T is not None:
            if tuple(x_T.shape) != shape:
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
            device = torch.device(device) if device is not None else x_T.device
            dtype = dtype or x_T.dtype
            x = x_T.to(device=device, dtype=dtype)
        else:
            device = torch.device(device) if device is not None else (
                generator.device if generator is not None else torch.device("cpu"))
            dtype = dtype or torch.float32
            x = _randn(shape, generator, device, dtype)
        _compute_dtype(x)
        if x_T is not None:
            _check_finite_tensor("x_T", x)

        if (known is None) != (known_mask is None):
            raise ValueError("known and known_mask must be given together")
        if known is not None:
            known = known.to(device=device, dtype=dtype)
            known_mask = known_mask.to(device=device, dtype=dtype)
            for name, v in (("known", known), ("known_mask", known_mask)):
                try:
                    torch.broadcast_shapes(v.shape, shape)
                except RuntimeError:
                    raise ValueError(f"{name} of shape {tuple(v.shape)} does not broadcast to {shape}") from None
            _check_finite_tensor("known", known)
            _check_finite_tensor("known_mask", known_mask)
            if bool(((known_mask < 0) | (known_mask > 1)).any()):
                raise ValueError("known_mask values must lie in [0, 1]")
            known = known.expand(shape)
            keep = 1.0 - known_mask
            t0 = pairs[0][0]
            noised = self.schedule.add_noise(known, _randn(shape, generator, device, dtype), t0)
            x = known_mask * noised + keep * x

        n_in = 2 * shape[0] if use_cfg else shape[0]
        cond_in = _cat_cond(uncond, cond, shape[0]) if use_cfg else cond
        # every step's (batch,) timestep tensor, built once: the loop itself never syncs
        t_all = torch.tensor([t for t, _ in pairs], dtype=torch.int64)[:, None].expand(-1, n_in)
        t_all = t_all.contiguous().to(device)

        for i, (t, prev_t) in enumerate(pairs):
            t_batch = t_all[i]
            if use_cfg:
                out = denoise_fn(torch.cat([x, x], dim=0), t_batch, cond_in)
                if not isinstance(out, torch.Tensor) or out.shape[0] != n_in:
                    raise ValueError(f"denoise_fn must return a tensor with batch {n_in}, got "
                                     f"{getattr(out, 'shape', type(out).__name__)}")
                out_u, out_c = out.chunk(2, dim=0)
                out = combine_guidance(out_u, out_c, scale)
            else:
                out = denoise_fn(x, t_batch, cond)
            if check_finite and not bool(torch.isfinite(out).all()):
                raise FloatingPointError(f"denoise_fn returned NaN/inf at step {i} (t={t})")
            x, x0 = self.step(out, t, x, prev_t=prev_t, generator=generator)
            if known is not None:
                if prev_t >= 0:
                    noised = self.schedule.add_noise(known, _randn(shape, generator, device, dtype), prev_t)
                else:
                    noised = known
                x = known_mask * noised + keep * x
            if callback is not None:
                callback(i, t, x, x0)

        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError("sampling produced NaN/inf values; run with check_finite=True to "
                                     "find the step whose model output was not finite")
        return x


class DDIMSampler(_Sampler):
    """DDIM (eta = 0: deterministic; eta = 1: DDPM-like ancestral noise).

    Options mirror diffusers' ``DDIMScheduler`` config: ``set_alpha_to_one`` picks the alpha
    past the last step (1, or ``a_0``); ``clip_sample`` / ``thresholding`` act on the predicted x0
    and are off by default; ``recompute_eps`` (diffusers: ``use_clipped_model_output``) re-derives
    eps from the clipped x0. ``prev_rule`` is explained in the module docstring. As in diffusers,
    ``steps_offset`` only applies to "leading" spacing and is ignored for the others.
    """

    def __init__(self, schedule: NoiseSchedule, *, prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0, set_alpha_to_one: bool = True,
                 eta: float = 0.0, prev_rule: str = "next", clip_sample: bool = False,
                 clip_sample_range: float = 1.0, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 recompute_eps: bool = False):
        super().__init__(schedule, prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                         steps_offset=steps_offset, clip_sample=clip_sample,
                         clip_sample_range=clip_sample_range, thresholding=thresholding,
                         dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                         sample_max_value=sample_max_value)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.final_alpha_cumprod = 1.0 if self.set_alpha_to_one else schedule._ac_list[0]
        self.eta = _check_float("eta", eta, 0.0)
        self.prev_rule = _check_choice("prev_rule", prev_rule, _PREV_RULES)
        self.recompute_eps = bool(recompute_eps)

    def _prev_list(self, ts: list[int], steps: int) -> list[int]:
        if self.prev_rule == "fixed_stride":
            stride = self.num_train_timesteps // steps
            return [max(t - stride, -1) for t in ts]
        return ts[1:] + [-1]

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, *, prev_t, eta: float | None = None,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> StepOutput:
        """One DDIM update from ``t`` to ``prev_t`` (ints, or per-sample int tensors (B,)).

        ``prev_t < 0`` uses the final alpha. With eta > 0 the added noise is ``noise`` if given,
        else drawn from ``generator`` (global RNG if None). Returns (prev_sample, pred_x0) in
        ``x_t``'s dtype. Does not scan values (no device sync).
        """
        cd = self._check_step_args(model_output, x_t)
        eta = self.eta if eta is None else _check_float("eta", eta, 0.0)
        if noise is not None and generator is not None:
            raise ValueError("pass either noise or generator, not both")
        sched = self.schedule
        a_t = sched._alpha_bar(t, x_t)
        a_p = sched._alpha_bar(prev_t, x_t, prev=True, final=self.final_alpha_cumprod)
        sa, sb = a_t**0.5, (1.0 - a_t) ** 0.5
        x = x_t.to(cd)
        x0, eps = _split_prediction(self.prediction_type, model_output.to(cd), x, sa, sb)
        x0 = self._process_x0(x0)
        if self.recompute_eps and (self.clip_sample or self.thresholding):
            eps = (x - sa * x0) / sb
        var = (1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p)
        sigma = eta * var**0.5
        direction = 1.0 - a_p - sigma**2
        direction = max(direction, 0.0) if isinstance(direction, float) else direction.clamp(min=0.0)
        prev = a_p**0.5 * x0 + direction**0.5 * eps
        if eta > 0:
            if noise is None:
                noise = _randn(x_t.shape, generator, x_t.device, x_t.dtype)
            elif noise.shape != x_t.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} must equal x_t shape {tuple(x_t.shape)}")
            prev = prev + sigma * noise.to(cd)
        return StepOutput(prev.to(x_t.dtype), x0.to(x_t.dtype))


class DDPMSampler(_Sampler):
    """Ancestral DDPM sampling (any step count; the jump t -> prev_t uses beta = 1 - a_t / a_p).

    ``variance_type``: "fixed_small" (posterior variance, clamped at 1e-20) or "fixed_large"
    (the jump's beta). No noise is added on the last step (``prev_t < 0``).
    """

    def __init__(self, schedule: NoiseSchedule, *, prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0,
                 variance_type: str = "fixed_small", clip_sample: bool = False,
                 clip_sample_range: float = 1.0, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0):
        super().__init__(schedule, prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                         steps_offset=steps_offset, clip_sample=clip_sample,
                         clip_sample_range=clip_sample_range, thresholding=thresholding,
                         dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                         sample_max_value=sample_max_value)
        self.variance_type = _check_choice("variance type", variance_type, _VARIANCE_TYPES)

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, *, prev_t,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> StepOutput:
        """One ancestral step from ``t`` to ``prev_t`` (ints, or per-sample int tensors (B,))."""
        cd = self._check_step_args(model_output, x_t)
        if noise is not None and generator is not None:
            raise ValueError("pass either noise or generator, not both")
        sched = self.schedule
        a_t = sched._alpha_bar(t, x_t)
        a_p = sched._alpha_bar(prev_t, x_t, prev=True, final=1.0)
        sa, sb = a_t**0.5, (1.0 - a_t) ** 0.5
        x = x_t.to(cd)
        x0, _ = _split_prediction(self.prediction_type, model_output.to(cd), x, sa, sb)
        x0 = self._process_x0(x0)
        alpha = a_t / a_p
        beta = 1.0 - alpha
        mean = (a_p**0.5 * beta / (1.0 - a_t)) * x0 + (alpha**0.5 * (1.0 - a_p) / (1.0 - a_t)) * x
        if self.variance_type == "fixed_small":
            var = (1.0 - a_p) / (1.0 - a_t) * beta
            var = max(var, 1e-20) if isinstance(var, float) else var.clamp(min=1e-20)
        else:
            var = beta
        if isinstance(prev_t, torch.Tensor) and prev_t.ndim > 0:
            # per-sample: no noise where this sample's step is the last one
            live = (prev_t.to(x.device) >= 0).to(cd).reshape(-1, *([1] * (x.ndim - 1)))
            var = var * live
            add = True
        else:
            add = int(prev_t) >= 0
        if add:
            if noise is None:
                noise = _randn(x_t.shape, generator, x_t.device, x_t.dtype)
            elif noise.shape != x_t.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} must equal x_t shape {tuple(x_t.shape)}")
            mean = mean + var**0.5 * noise.to(cd)
        return StepOutput(mean.to(x_t.dtype), x0.to(x_t.dtype))


# ----------------------------------------------------------------------------------------------
# consistency (LCM) sampling for distilled students

CONSISTENCY_SIGMA_DATA = 0.5
CONSISTENCY_TIMESTEP_SCALING = 10.0


def consistency_boundary(t, x: torch.Tensor, *, sigma_data: float = CONSISTENCY_SIGMA_DATA,
                         timestep_scaling: float = CONSISTENCY_TIMESTEP_SCALING):
    """(c_skip, c_out) of the LCM boundary condition at timestep ``t`` (int or (B,) tensor).

    ``t <= 0`` gives (1, 0), so ``f(x, 0) = x`` exactly. Floats for an int ``t``, else
    (B, 1, ...) tensors in ``x``'s compute dtype.
    """
    sd2 = sigma_data**2
    if isinstance(t, torch.Tensor) and (t.ndim > 0 or t.device.type != "cpu"):
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
            raise ValueError(f"timestep tensor must have shape () or ({x.shape[0]},), got {tuple(t.shape)}")
        s = (t.to(device=x.device, dtype=_compute_dtype(x)).clamp(min=0) * timestep_scaling)
        s = s.reshape(-1, *([1] * (x.ndim - 1)))
        return sd2 / (s**2 + sd2), s / (s**2 + sd2) ** 0.5
    s = max(int(t), 0) * timestep_scaling
    return sd2 / (s * s + sd2), s / math.sqrt(s * s + sd2)


def consistency_x0(schedule: NoiseSchedule, prediction_type: str, model_output: torch.Tensor,
                   x_t: torch.Tensor, t, **boundary) -> torch.Tensor:
    """A consistency student's x0: ``c_skip x_t + c_out x0_pred`` (same for training and sampling)."""
    _check_choice("prediction type", prediction_type, PREDICTION_TYPES)
    cd = _compute_dtype(x_t)
    sa, sb = schedule._sa_sb(t, x_t)
    x = x_t.to(cd)
    x0, _ = _split_prediction(prediction_type, model_output.to(cd), x, sa, sb)
    c_skip, c_out = consistency_boundary(t, x, **boundary)
    return (c_skip * x + c_out * x0).to(x_t.dtype)


class ConsistencySampler(_Sampler):
    """Multistep consistency sampling (LCM) for distilled students: 1, 2, 4... steps.

    Each step maps x_t to the student's x0 (:func:`consistency_x0`) and, unless it is the last
    step, noises that x0 afresh to ``prev_t``. Guidance is folded into the student, so sample
    with ``guidance_scale=1``. Default spacing "trailing" (T=1000: 1 step -> [999], 2 -> [999, 499],
    4 -> [999, 749, 499, 249]), the grid the students are distilled on.
    """

    def __init__(self, schedule: NoiseSchedule, *, prediction_type: str = "epsilon",
                 timestep_spacing: str = "trailing", sigma_data: float = CONSISTENCY_SIGMA_DATA,
                 timestep_scaling: float = CONSISTENCY_TIMESTEP_SCALING, clip_sample: bool = False,
                 clip_sample_range: float = 1.0):
        super().__init__(schedule, prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                         steps_offset=0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                         thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
        self.sigma_data = _check_float("sigma_data", sigma_data, 1e-6)
        self.timestep_scaling = _check_float("timestep_scaling", timestep_scaling, 0.0)

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, *, prev_t,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> StepOutput:
        """x0 = f(x_t, t); prev = sqrt(a_p) x0 + sqrt(1 - a_p) z (prev = x0 where ``prev_t < 0``)."""
        self._check_step_args(model_output, x_t)
        if noise is not None and generator is not None:
            raise ValueError("pass either noise or generator, not both")
        x0 = consistency_x0(self.schedule, self.prediction_type, model_output, x_t, t,
                            sigma_data=self.sigma_data, timestep_scaling=self.timestep_scaling)
        x0 = self._process_x0(x0)
        per_sample = isinstance(prev_t, torch.Tensor) and prev_t.ndim > 0
        if not per_sample and int(prev_t) < 0:
            return StepOutput(x0, x0)
        if noise is None:
            noise = _randn(x_t.shape, generator, x_t.device, x_t.dtype)
        elif noise.shape != x_t.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x_t shape {tuple(x_t.shape)}")
        a_p = self.schedule._alpha_bar(prev_t, x0, prev=True, final=1.0)
        prev = self.schedule._lin(a_p**0.5, x0, (1.0 - a_p) ** 0.5, noise)
        return StepOutput(prev, x0)
