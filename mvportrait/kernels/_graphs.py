"""CUDA graphs for the kernels' public calls, and a cache of one-time input checks.

Why: on a GPU the FLAME forward and the rasterizer are host-bound (docs/gpu_notes.md: LBS spends
~1.3 ms launching ~40 small kernels whose GPU time is a few microseconds; the rasterizer's GPU
work is 0.19 ms of a 0.88 ms call). A CUDA graph replays the whole recorded launch sequence with
one host call.

:class:`GraphCache` keeps one captured graph per key (shapes, dtypes, device and the addresses
of the constant tensors the call reads, e.g. the FLAME blendshapes). A call copies its inputs
into the graph's static input buffers, replays the graph and hands the static outputs to
``finish`` (default: clone them, so results never alias the next replay), all under a lock; a
caller on another stream than the previous replay's first waits for that stream. Constant tensors are read
at replay time through their addresses: in-place updates of them are seen, and the cache keeps
a reference so their memory cannot be reused while a graph points at it. The captured function
must not synchronise with the host (no ``.item()``, ``.tolist()``, data-dependent shapes); the
callers put their one data-dependent check after the replay.

:func:`capture` (one graph with its static buffers, a :class:`StaticGraph`) is what the cache
stores per key; a caller that owns a single graph (e.g. :class:`mvportrait.kernels.lbs.LBSPlan`)
uses it directly and skips the per-call key building.

Graphs are used only where they are valid: a CUDA device, ``MVP_CUDA_GRAPHS`` not ``0``, not
already inside a capture, and no input that autograd would have to track (:func:`usable`).
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from mvportrait import envs

__all__ = ["GraphCache", "StaticGraph", "capture", "usable", "once"]


def usable(device: torch.device, tensors: Sequence[torch.Tensor | None] = ()) -> bool:
    """Whether a call on ``device`` reading ``tensors`` may replay a CUDA graph."""
    if device.type != "cuda" or not envs.cuda_graphs():
        return False
    if torch.cuda.is_current_stream_capturing():  # inside a caller's own capture: launch normally
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return True


def _key_of(t: torch.Tensor | None):
    if t is None:
        return None
    return (tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class StaticGraph:
    """One captured CUDA graph (:func:`capture`): its static inputs and outputs, and the stream of
    the last replay. ``keep`` holds the constants the graph reads, so their memory stays allocated."""

    __slots__ = ("graph", "inputs", "outputs", "keep", "stream", "_dst")

    def __init__(self, graph, inputs, outputs, keep, stream):
        self.graph, self.inputs, self.outputs, self.keep, self.stream = graph, inputs, outputs, keep, stream
        self._dst = [t for t in inputs if t is not None]

    def replay(self, inputs: Sequence[torch.Tensor | None]):
        """Copy ``inputs`` (``None`` where the capture had ``None``) into the static inputs in one batched
        copy, replay on the current stream and return the static outputs (valid until the next replay).
        A replay on another stream than the previous one first waits for that stream, so the previous
        outputs were consumed there. Not thread-safe: callers hold their own lock."""
        stream = torch.cuda.current_stream()
        if self.stream is not None and self.stream != stream:
            stream.wait_stream(self.stream)
        if self._dst:
            torch._foreach_copy_(self._dst, [s for s in inputs if s is not None])  # one dispatch
        self.graph.replay()
        self.stream = stream
        return self.outputs


def capture(fn: Callable, inputs: Sequence[torch.Tensor | None], *, keep: Sequence[torch.Tensor] = (),
            warmup: int = 2) -> StaticGraph:
    """Capture ``fn(*static)`` as a CUDA graph, ``static`` being clones of ``inputs`` (``None`` kept).

    ``fn`` runs ``warmup`` times on a side stream first (compiles kernels, settles the allocator),
    then once under capture; the graph is replayed once, so its outputs hold ``fn(*inputs)`` on return.
    ``fn`` must not synchronise with the host. Raises RuntimeError if the capture fails.
    """
    with torch.inference_mode(False):  # static buffers must accept copy_ in and out of inference mode
        static = [None if t is None else t.clone() for t in inputs]  # clone keeps dense strides
    side = torch.cuda.Stream(device=next((t.device for t in static if t is not None), None))
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles kernels, settles allocator and library handles
        for _ in range(warmup):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: work that other threads (the stream's stage-1 worker) launch meanwhile is not
    # an error for this capture and is not captured
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = tuple(fn(*static))
    graph.replay()  # the capture recorded the work without running it
    return StaticGraph(graph, static, outputs, tuple(keep), torch.cuda.current_stream())


class GraphCache:
    """At most ``max_entries`` captured graphs of one operation (least recently used dropped)."""

    def __init__(self, name: str, max_entries: int = 8, warmup: int = 2):
        self.name, self.max_entries, self.warmup = name, max_entries, warmup
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._failed: set = set()
        self.captures = 0  # how many graphs were captured (tests and benchmarks read it)
        self.replays = 0

    def run(self, key, fn: Callable, inputs: Sequence[torch.Tensor | None], *,
            keep: Sequence[torch.Tensor] = (), finish: Callable | None = None):
        """``finish(fn(*inputs))`` through a graph captured for ``key`` (plus the inputs' shapes,
        strides, dtypes and the addresses of ``keep``, the constants ``fn`` reads).

        ``fn`` takes the inputs (``None`` entries are passed as ``None``) and returns a tuple of
        tensors (``None`` allowed). ``finish`` receives that tuple of static outputs and must not
        keep references to them; by default every tensor is cloned.
        """
        full_key = (key, tuple(_key_of(t) for t in inputs),
                    tuple((t.data_ptr(), _key_of(t)) for t in keep))
        finish = finish or _clone_all
        with self._lock:
            if full_key in self._failed:
                return finish(tuple(fn(*inputs)))
            entry = self._entries.get(full_key)
            if entry is None:
                try:
                    entry = capture(fn, inputs, keep=keep, warmup=self.warmup)
                except RuntimeError as e:  # e.g. an op that cannot be captured: run eagerly from now on
                    warnings.warn(f"{self.name}: CUDA graph capture failed ({e}); running without graphs for "
                                  "these shapes", RuntimeWarning, stacklevel=3)
                    self._failed.add(full_key)
                    torch.cuda.synchronize()
                    return finish(tuple(fn(*inputs)))
                self.captures += 1
                if len(self._entries) >= self.max_entries:
                    self._entries.popitem(last=False)
                self._entries[full_key] = entry
            else:
                self._entries.move_to_end(full_key)
                entry.replay(inputs)
            self.replays += 1
            return finish(entry.outputs)


def _clone_all(outputs):
    return tuple(None if t is None else t.clone() for t in outputs)


# ------------------------------------------------------------------------ one-time work on constants
_ONCE: OrderedDict = OrderedDict()
_ONCE_LOCK = threading.Lock()
_ONCE_MAX = 64


def once(tag: str, tensors: Sequence[torch.Tensor], fn: Callable, extra=()):
    """``fn()`` computed once per content of ``tensors`` (+ ``extra``) and cached afterwards.

    For work on inputs that are constant across frames (FLAME parents, mesh faces, the joint
    basis of a blendshape set): value checks that read the tensor back to the host (a device
    sync per call on a GPU) and derived tables. The key is each tensor's address, shape, dtype,
    device and version counter (in-place updates bump it, so they are seen -- except for
    inference tensors, which have no counter); the cache keeps a
    reference to the tensors so their addresses cannot be reused by other tensors while cached.
    Exceptions are not cached: a failing check raises on every call.
    """
    key = (tag, extra) + tuple((t.data_ptr(), tuple(t.shape), t.dtype, t.device, _version(t)) for t in tensors)
    with _ONCE_LOCK:
        if key in _ONCE:
            _ONCE.move_to_end(key)
            return _ONCE[key][0]
    value = fn()
    with _ONCE_LOCK:
        _ONCE[key] = (value, tuple(tensors))
        while len(_ONCE) > _ONCE_MAX:
            _ONCE.popitem(last=False)
    return value


def _version(t: torch.Tensor):
    # inference tensors (made under torch.inference_mode) have no version counter: for them an
    # in-place update inside inference mode is not noticed (constants are not updated that way)
    return None if t.is_inference() else t._version
