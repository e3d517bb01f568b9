"""Lazy Triton loading shared by the kernel modules.

Triton decides compiled vs interpreted from ``TRITON_INTERPRET`` once, when triton itself is
imported (its own ``@jit`` helpers such as ``tl.zeros`` are wrapped then). Kernel modules keep
``triton = tl = None`` globals and plain functions marked ``@triton_kernel``; ``launcher`` imports
triton on first use, fills those globals in the kernel's module and wraps the kernel to match.
Importing mvportrait never imports triton.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

_LAUNCHERS: dict = {}


def triton_kernel(fn):
    """Mark ``fn`` as a Triton kernel; ``launcher`` jit-compiles (or interprets) it on first use."""
    fn.__triton_kernel__ = True
    return fn


@functools.cache
def triton_available() -> bool:
    """Whether the triton package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def launcher(kernel, device: torch.device, op: str):
    """``kernel`` as Triton can launch it now (compiled, or interpreted under TRITON_INTERPRET=1)."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise RuntimeError(f"{op}: impl='triton' needs the triton package (pip install triton)") from e
    from triton.runtime.interpreter import InterpretedFunction

    interpret = bool(triton.knobs.runtime.interpret)
    if interpret != isinstance(triton.language.standard.zeros, InterpretedFunction):
        raise RuntimeError(f"{op}: TRITON_INTERPRET={int(interpret)} now, but triton was imported with it "
                           f"{'off' if interpret else 'on'}; set TRITON_INTERPRET before the first import of "
                           "triton in the process")
    if not interpret and device.type != "cuda":
        raise RuntimeError(f"{op}: impl='triton' with {device.type} tensors runs only under the Triton "
                           "interpreter (set TRITON_INTERPRET=1 before triton is imported); use CUDA tensors "
                           "or impl='ref'/'auto'")
    key = (kernel, interpret)
    if key not in _LAUNCHERS:
        kernel.__globals__.update(triton=triton, tl=tl)  # the kernel body resolves tl.* at trace time
        _LAUNCHERS[key] = InterpretedFunction(kernel) if interpret else triton.jit(kernel)
    return _LAUNCHERS[key]
