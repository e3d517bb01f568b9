"""End to end, text -> multi-view frames: the naive pipeline vs the engine, in the same run.

    python benchmarks/bench_e2e.py [--preset tiny|sd15|micro] [--views 4] [--frames 20] [--threads 2] ...
    mvportrait bench e2e ...                  (same options; ``--help`` lists them)

Both pipelines turn the same prompt into ``--frames`` frames of ``--views`` views:

* **naive** (:mod:`mvportrait.engine.naive`): the teacher models, eager PyTorch, full-step DDIM (25 stage-2
  steps, 50 stage-1 steps) with classifier-free guidance as two calls, the reference UNet recomputed at
  every step, renders / FLAME encoder / decoder one view at a time, reference LBS and rasterizer; stage 1
  for the whole sequence first, then stage 2 window by window.
* **engine** (:class:`StreamingEngine`): students when present (consistency sampling, guidance folded: one
  call per step) else the teacher with few DDIM steps ([cond; uncond] batched), reference K/V cached once,
  views and windows batched, stream batch, fast kernels (C++ rasterizer on CPU, Triton on GPU), stage 1
  in a look-ahead thread, ``--backend`` for stage 2, stage 2 in ``--engine-dtype`` (auto, as ``generate`` /
  ``stream``: bfloat16 with the torch / compile backend on CUDA or on a CPU with oneDNN bfloat16 kernels,
  else float32; channels_last on a CPU, ``--channels-last``; the naive pipeline stays in ``--dtype``, float32
  on CPU, NCHW). With random weights (sd15, micro) the engine runs
  the consistency sampler on the same network: what a student of that preset costs.

Measured per pipeline (each in its own process unless ``--no-isolate``, after a short warm-up):
time to first frame (from the prompt to the first frame out, reference preparation included; model
loading and backend builds excluded), steady-state frame sets per second (all views; the frames after
the first window over the time after it), peak memory (CPU: resident set size sampled every 2 ms during
the run; CUDA: ``torch.cuda.max_memory_allocated``), and the per-stage breakdown in seconds per frame
set: text encoding (per stream), stage 1, LBS, raster, FLAME encoder, reference, stage-2 steps
(UNet), decode. The naive pipeline's stages are timed inline (it is sequential); the engine's are each
stage run alone at the stream's shapes (its stages overlap in threads, so inline clocks would not add
up), and ``other`` is what the end-to-end rate leaves. Then the ratio engine / naive. The engine's
first-frame row also carries ``first_frame_synced_ms`` (window 0's path on the stream worker thread,
the device synchronised after each part: see :func:`first_frame_synced`) and
``first_frame_prepared_reference_s`` (one more stream of the same portrait, its reference context made
beforehand: what an app streaming one avatar waits for). A
``torch.profiler`` top-ops table of both (the engine's steady state run synchronously; the naive
pipeline for one window at 2 steps: the per-step op mix is the same) goes to the profile file.

Rows (harness: name, backend, metric, unit, p50, p90, config, device, versions, git_sha) go to
``benchmarks/results/e2e_cpu.json`` (tiny), ``e2e_sd15_cpu.json`` (sd15), ``*_gpu.json`` on CUDA.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, row, write  # noqa: E402

from mvportrait.cli_bench import add_e2e_arguments, check_e2e_args  # noqa: E402

log = logging.getLogger("bench_e2e")

TARGETS = {"cpu": {"fps": 24.0, "first_frame_s": 1.0, "speedup": 50.0},
           "cuda": {"fps": 30.0, "first_frame_s": 0.15, "speedup": 50.0}}
ENGINE_STAGES = ("text", "stage1", "lbs", "raster", "flame_encoder", "unet", "decode")
NAIVE_STAGES = ("text", "stage1", "lbs", "raster", "flame_encoder", "reference", "unet", "decode")
STUDENT2 = Path(__file__).resolve().parent.parent / "mvportrait" / "weights" / "stage2_student"
STAGE1 = Path(__file__).resolve().parent.parent / "mvportrait" / "weights" / "stage1"  # students beside teachers


# ------------------------------------------------------------------------------------ models
def _device(args) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _dtype(args, dev) -> torch.dtype:
    if args.dtype == "auto":  # bfloat16 on CUDA: fp16's range overflows with random sd15 weights
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def _engine_dtype(args, dev) -> torch.dtype:
    """The engine's stage-2 precision: auto = what ``generate`` / ``stream`` pick by default
    (:func:`mvportrait.engine.flame2video.auto_dtype`: bfloat16 with the torch / compile backend on CUDA and
    on a CPU whose oneDNN has bfloat16 kernels, else float32)."""
    from mvportrait.engine.flame2video import auto_dtype

    if getattr(args, "engine_dtype", "auto") != "auto":
        return getattr(torch, args.engine_dtype)
    return auto_dtype(dev, args.backend)


def _micro_config(size, window):
    from mvportrait.config import AutoencoderConfig, Stage2Config, UNetConfig

    unet = UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(False, True), head_dim=8,
                      cross_attention_dim=16, norm_groups=4, temporal_attentions=1, flame_widths=(4, 8, 8))
    ae = AutoencoderConfig(block_out=(8, 16, 16), layers_per_block=1, norm_groups=4, mid_attention=False)
    return Stage2Config(autoencoder=ae, unet=unet, image_size=size or 32, views=2, frames=window or 4,
                        image_tokens=4, image_embed_width=8, prediction="v_prediction", guidance=2.0)


def _json(path: Path) -> dict:
    """A JSON object file's content; {} when missing or unreadable."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _consistency(cfg_like, prediction):
    from mvportrait.engine.schedulers import ConsistencySampler, NoiseSchedule

    return ConsistencySampler(NoiseSchedule.from_kind(cfg_like.beta_schedule, cfg_like.train_timesteps),
                              prediction_type=prediction)


def _stage1(args, dev):
    """(teacher Text2FLAME, engine Text2FLAME, engine stage-1 steps, engine stage-1 guidance, note)."""
    from mvportrait.config import DenoiserConfig
    from mvportrait.engine.text2flame import STUDENT_STEMS, Text2FLAME
    from mvportrait.models.motion_denoiser import MotionDenoiser
    from mvportrait.models.text_encoder import HashingEncoder, open_text_encoder

    if args.preset == "micro":
        torch.manual_seed(1)
        enc = HashingEncoder() if args.text_model in (None, "hashing") else open_text_encoder(args.text_model)
        t2f = Text2FLAME(MotionDenoiser(DenoiserConfig.from_name("tiny", "motion")).to(dev),
                         MotionDenoiser(DenoiserConfig.from_name("tiny", "emotion")).to(dev), enc, overlap=8)
        return t2f, t2f, args.stage1_steps or 2, None, "random tiny denoisers (teacher DDIM)"
    if args.text_model == "hashing":  # no MiniLM on the machine: same stage-1 networks, a cheaper text encoder
        teacher = Text2FLAME.from_pretrained(device=dev, text_encoder=HashingEncoder())
    else:
        teacher = Text2FLAME.from_pretrained(device=dev, text_model=args.text_model)
    if args.sampler != "ddim" and all((STAGE1 / f"{s}.safetensors").is_file() for s in STUDENT_STEMS):
        student = Text2FLAME.from_pretrained(student=True, device=dev, text_encoder=teacher.text_encoder)
        return teacher, student, args.stage1_steps or student.default_steps, 1.0, "students (consistency)"
    return teacher, teacher, args.stage1_steps or 10, None, "teacher (DDIM)"


def _as_dtype(model, dtype):
    """``model`` itself when it already has ``dtype``, else a converted copy (the naive pipeline keeps its own)."""
    if next(model.parameters()).dtype == dtype:
        return model
    import copy

    return copy.deepcopy(model).to(dtype).eval()


def _random_tiny_decoder(model):
    """A tiny decoder of the shipped design for ``model``'s latents, random weights (what one costs)."""
    from mvportrait.models.tiny_decoder import TinyDecoder, TinyDecoderConfig

    ae = model.config.autoencoder
    factor = 2 ** (len(ae.block_out) - 1)
    stages = factor.bit_length()
    shipped = TinyDecoderConfig()
    channels = tuple(shipped.channels[min(i, len(shipped.channels) - 1)] for i in range(stages))
    blocks = tuple(shipped.blocks[min(i, len(shipped.blocks) - 1)] for i in range(stages))
    torch.manual_seed(0)
    return TinyDecoder(TinyDecoderConfig(latent_channels=ae.latent_channels, factor=factor, channels=channels,
                                         blocks=blocks))


def load_models(args, which: str) -> dict:
    """The naive pipeline's teacher, the engine's stage 2 (student / stand-in / teacher), both stage 1s.

    ``which`` = "naive" or "engine" (each pipeline's own process): the other pipeline's stage-2 networks are
    not kept, so the process's peak memory is its own pipeline's (``teacher`` / ``engine`` is then None)."""
    from mvportrait.engine.flame2video import DEFAULT_REFERENCE, DEFAULT_WEIGHTS, FLAME2Video
    from mvportrait.models.stage2 import FLAME2VideoModel

    if which not in ("naive", "engine"):  # one pipeline per call: an engine in channels_last converts the
        raise ValueError(f"which must be 'naive' or 'engine', got {which!r}")  # module it shares in place
    dev = _device(args)
    dtype, engine_dtype = _dtype(args, dev), _engine_dtype(args, dev)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    random_weights = False
    if args.weights or args.preset == "tiny":
        folder = Path(args.weights) if args.weights else DEFAULT_WEIGHTS
        model = FLAME2VideoModel.from_pretrained(folder, device=dev, dtype=dtype)
        note = f"{'shipped tiny' if not args.weights else folder.name} teacher"
        fps = _json(folder / "train_summary.json").get("fps")
    else:
        from mvportrait.config import Stage2Config

        torch.manual_seed(0)
        if args.preset == "sd15":
            cfg = Stage2Config.from_name("sd15", image_size=args.size or 512, views=args.views,
                                         **({"frames": args.window} if args.window else {}))
        else:
            cfg = _micro_config(args.size, args.window)
        with torch.device(dev):
            model = FLAME2VideoModel(cfg)
        model = model.to(dtype).eval()
        note, fps, random_weights = f"{args.preset} preset, random weights", None, True
    kw = {"fps": fps} if fps else {}
    window = model.config.frames
    overlap = min(2, window - 1)
    teacher = FLAME2Video(model, overlap=overlap, backend="torch", channels_last=False, **kw)  # plain NCHW
    # the engine's stage 2
    engine_note = ""
    kw["channels_last"] = {"auto": None, "on": True, "off": False}[getattr(args, "channels_last", "auto")]
    sampler = args.sampler
    student_dir = STUDENT2 if args.preset == "tiny" and not args.weights else None
    if sampler in ("auto", "consistency") and student_dir is not None and (student_dir / "config.json").is_file():
        engine = FLAME2Video.from_pretrained(student_dir, student=True, device=dev, dtype=engine_dtype,
                                             backend=args.backend, overlap=overlap, decoder=args.decoder, **kw)
        steps = args.steps or engine.default_steps
        engine_note, guidance = "shipped student (consistency)", 1.0
    elif sampler == "consistency" or (sampler == "auto" and random_weights):
        engine = None
        if which != "naive":  # (a converted copy of a 2.6 B-parameter network is 5+ GB: not in the naive process)
            engine = FLAME2Video(_as_dtype(model, engine_dtype), overlap=overlap, backend=args.backend,
                                 decoder=_random_tiny_decoder(model) if args.decoder == "tiny" else None, **kw)
            engine.sampler = _consistency(engine.config, engine.config.prediction)
        steps, guidance = args.steps or 1, 1.0
        engine_note = ("consistency sampler on the same network (random weights: what a student costs)"
                       if random_weights else "teacher network with a consistency sampler (no student shipped)")
    else:
        engine = None if which == "naive" else FLAME2Video(_as_dtype(model, engine_dtype), overlap=overlap,
                                                           backend=args.backend, **kw)
        steps, guidance = args.steps or 4, float(model.config.guidance)
        engine_note = f"teacher, {steps} DDIM steps, guidance batched"
    teacher_t2f, engine_t2f, s1_steps, s1_guidance, s1_note = _stage1(args, dev)
    cfg = model.config
    image_size, fps_model = cfg.image_size, teacher.fps
    if which == "engine":
        teacher = model = None  # the engine process keeps only the engine's networks
    ref = DEFAULT_REFERENCE if DEFAULT_REFERENCE.is_file() else (torch.rand(3, cfg.image_size, cfg.image_size) * 2 - 1)
    return dict(dev=dev, dtype=dtype, engine_dtype=engine_dtype, teacher=teacher, engine=engine, t2f=teacher_t2f,
                engine_t2f=engine_t2f, image_size=image_size, fps_model=fps_model,
                steps=steps, guidance=guidance, stage1_steps=s1_steps, stage1_guidance=s1_guidance, reference=ref,
                load_s=time.perf_counter() - t0,
                note=note, engine_note=engine_note, stage1_note=s1_note, window=window, overlap=overlap)


# ------------------------------------------------------------------------------------ measuring
class PeakMemory:
    """Peak resident set size (CPU, sampled every 2 ms) or CUDA max allocated, in MB, over a ``with``."""

    def __init__(self, dev: torch.device):
        self.dev, self.peak_mb = dev, 0.0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page / 2**20

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_mb = self._rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._rss())


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _rates(arrivals: list[float], first_window: int) -> tuple[float, float | None]:
    """(time to first frame, steady-state frame sets per second after the first window)."""
    n = len(arrivals)
    if n <= first_window:
        return arrivals[0], None
    span = arrivals[-1] - arrivals[first_window - 1]
    return arrivals[0], (n - first_window) / span if span > 0 else None


def _zero_flame(frames: int, fps: float):
    """A neutral FLAME sequence of ``frames`` frames at ``fps`` (warm-up and stage timing inputs)."""
    from mvportrait.flame.params import FlameParams

    return FlameParams.zeros(1, frames, 300, 50, fps=fps)


def run_naive(args, m: dict) -> dict:
    from mvportrait.engine.naive import NaivePipeline

    naive = NaivePipeline(m["teacher"], m["t2f"])
    pipe, views = m["teacher"], f"ring-{args.views}"
    seconds = args.frames / pipe.fps
    with torch.inference_mode():  # warm-up: one window at one step (lazy initialisation, allocator)
        list(naive.windows(m["reference"], _zero_flame(m["window"], pipe.fps), views=views, steps=1))
        naive.text2flame(args.prompt + " .", seconds=min(seconds, 1.0), steps=1)
    naive.reset_timings()
    arrivals = []
    with PeakMemory(m["dev"]) as mem:
        t0 = time.perf_counter()
        fp = naive.text2flame(args.prompt, seconds=seconds, steps=args.naive_stage1_steps, seed=args.seed)
        for chunk in naive.windows(m["reference"], fp, views=views, steps=args.naive_steps, seed=args.seed):
            arrivals += [time.perf_counter() - t0] * chunk.shape[0]
        total = time.perf_counter() - t0
    first, fps = _rates(arrivals, min(m["window"], len(arrivals)))
    n = len(arrivals)
    stages = {k: v / (1 if k == "text" else n) for k, v in naive.timings.items()}
    stages["other"] = max(0.0, (total - sum(naive.timings.values())) / n)
    out = dict(first_frame_s=first, fps=fps, frames=n, total_s=total, peak_mb=mem.peak_mb, stages=stages,
               steps=args.naive_steps, stage1_steps=args.naive_stage1_steps,
               guidance=float(pipe.config.guidance))
    if _profile_path(args) is not None:
        out["profile"] = _profile(m["dev"], lambda: list(naive.windows(
            m["reference"], _zero_flame(m["window"], pipe.fps), views=views, steps=2)))
    return out


def _stream(engine, m, args, seconds, reference=None, **kw):
    engine.prepare(m["reference"] if reference is None else reference, args.prompt, views=f"ring-{args.views}", seconds=seconds, steps=m["steps"],
                   guidance=m["guidance"], stage1_steps=m["stage1_steps"], stage1_guidance=m["stage1_guidance"],
                   seed=args.seed, realtime=False, first_window=getattr(args, "first_window", None),
                   prefetch={"auto": None, "on": True, "off": False}[getattr(args, "prefetch", "auto")],
                   queue_size=args.frames + 64, **kw)


def run_engine(args, m: dict) -> dict:
    from mvportrait.engine.stream import StreamingEngine

    pipe = m["engine"]
    engine = StreamingEngine(pipe, m["engine_t2f"])
    seconds = args.frames / pipe.fps
    for _ in range(2):  # warm-up: every batch shape the stream uses (ramp-up, steady state, drain)
        _stream(engine, m, args, seconds=min(seconds, (m["window"] + 3 * (m["window"] - m["overlap"])) / pipe.fps))
        with engine.stream() as s:
            list(s)
    arrivals, timings = [], []
    with PeakMemory(m["dev"]) as mem:
        t0 = time.perf_counter()
        _stream(engine, m, args, seconds)
        t_prep = time.perf_counter() - t0
        with engine.stream() as s:
            for f in s:
                arrivals.append(time.perf_counter() - t0)
                timings.append(f.timings)
            stats = s.stats
        total = time.perf_counter() - t0
    n = len(arrivals)
    n0 = min(engine.settings.first_window or m["window"], n)  # window 0's frames
    first, fps = _rates(arrivals, n0)  # steady state: from window 0's last frame on
    stages = engine_stage_costs(engine, m, args)
    if fps:
        stages["other"] = max(0.0, 1.0 / fps - sum(v for k, v in stages.items() if k != "text"))
    mean = lambda name: sum(getattr(t, name) for t in timings) / n  # noqa: E731
    # the first frame's path: prepare, then window 0 (its frames share its stage-1 / render / denoise
    # costs: scaled back to the window), the first frame's decode, and admit -> queued in all
    t = timings[0]
    first_parts = dict(prepare_s=t_prep, stage1_s=t.stage1_s * n0, render_s=t.render_s * n0,
                       denoise_s=t.denoise_s * n0, decode_s=t.decode_s, admit_to_queued_s=t.latency_s)
    out = dict(first_frame_s=first, fps=fps, frames=n, total_s=total, prepare_s=t_prep, peak_mb=mem.peak_mb,
               first_parts=first_parts,
               stages=stages, steps=m["steps"], stage1_steps=m["stage1_steps"], guidance=m["guidance"],
               stream_batch=engine.settings.stream_batch, mean_batch=stats.mean_batch,
               first_window=engine.settings.first_window,
               prefetch=engine.settings.prefetch,
               frame_timings={k: mean(k) for k in ("stage1_s", "render_s", "denoise_s", "decode_s", "latency_s")})
    # on the engine's worker thread, where its streams run (per-thread GPU library caches are warm there)
    out["first_synced"] = _on_worker(engine, lambda: first_frame_synced(engine, m, args))
    # a stream of the same portrait with its reference context made beforehand (engine.stage2.prepare, as an
    # app streaming one avatar keeps it): its first frame without the image loading and the reference network
    ctx = pipe.prepare(m["reference"])
    _sync(m["dev"])
    t0 = time.perf_counter()
    _stream(engine, m, args, seconds, reference=ctx)
    with engine.stream() as s:
        next(s)
        out["first_frame_prepared_reference_s"] = time.perf_counter() - t0
    if _profile_path(args) is not None:
        out["profile"] = _profile(m["dev"], lambda: _run_sync(engine, m, args))
        first_call = {}
        _on_worker(engine, lambda: first_frame_synced(engine, m, args, profile_first_call=first_call))
        out["profile_first_call"] = first_call.get("table", "(not profiled)")
    return out


def _on_worker(engine, fn):
    """``fn()`` run on the engine's stream worker thread; its result, or its exception raised here."""
    box = {}

    def job():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    done = engine._worker.submit(job)
    done.join(1800)
    if done.is_alive():
        raise TimeoutError("bench e2e: the engine's worker thread did not finish the measurement in 30 min")
    if "error" in box:
        raise box["error"]
    return box["value"]


@torch.inference_mode()
def first_frame_synced(engine, m, args, profile_first_call: dict | None = None) -> dict:
    """The first frame's path run in the calling thread (the bench runs it on the engine's worker
    thread, as a stream's; stage 1 inline, no look-ahead thread), the device synchronised after each
    part, in seconds: prepare; window 0's admission (stage 1, render, FLAME
    encoder, noise); its model calls, split into the host's launch time and the wait for the device
    after it; the sampler updates; the first frame's decode to host uint8. Against the threaded
    stream's first frame this separates device work from host / thread overheads. ``model_again_s``: the
    first model call repeated at once on the same inputs (synchronised; its result is dropped), so a
    cost of a stream's first call shows as the difference (session 9 on an H200 also timed the call after
    a reference-network run, 100 ms: no cache eviction, so that probe was dropped). ``profile_first_call``: a dict that receives
    a torch.profiler table (host and device) of window 0's first model call under ``"table"``. With
    ``--prefetch on`` the calls run on the compute stream as in a stream, but nothing is prefetched here
    (window 0 has no predecessor call to overlap)."""
    from mvportrait.engine import stream_batch as sb

    dev = m["dev"]
    _sync(dev)
    t0 = time.perf_counter()
    _stream(engine, m, args, args.frames / engine.stage2.fps, lookahead=False)
    _sync(dev)
    parts = dict(prepare_s=time.perf_counter() - t0, admit_s=0.0, model_launch_s=0.0, model_wait_s=0.0,
                 update_s=0.0, decode_s=0.0)
    st = engine.state
    st.started = True
    try:
        first = None
        while first is None:
            t = time.perf_counter()
            plan = sb._schedule(st)
            _sync(dev)
            parts["admit_s"] += time.perf_counter() - t  # the first call admits window 0; later ones ~0
            first_call = "model_again_s" not in parts
            t = time.perf_counter()
            if first_call and profile_first_call is not None:
                profile_first_call["table"] = _profile(dev, lambda: sb._execute(st, plan), rows=25, by="cpu")
            else:
                sb._execute(st, plan)
            parts["model_launch_s"] += time.perf_counter() - t
            t = time.perf_counter()
            _sync(dev)
            parts["model_wait_s"] += time.perf_counter() - t
            if first_call:
                out = plan.out
                t = time.perf_counter()
                sb._execute(st, plan)
                _sync(dev)
                parts["model_again_s"] = time.perf_counter() - t
                plan.out = out
            t = time.perf_counter()
            sb._update(st, plan)
            _sync(dev)
            parts["update_s"] += time.perf_counter() - t
            first = next((w for w in plan.finished if w.index == 0), None)
        t = time.perf_counter()
        img = st.pipe.decoder.decode(first.final[:, first.emit_from - first.start])
        ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        parts["decode_s"] = time.perf_counter() - t
    finally:
        st.driver.close()
        st.release()
    parts["total_s"] = time.perf_counter() - t0
    return parts


def _run_sync(engine, m, args):
    """The whole stream in this thread (stage 1 inline), so the profiler sees every op."""
    from mvportrait.engine.stream_batch import run

    w, o = m["window"], m["overlap"]
    _stream(engine, m, args, seconds=(w + 3 * (w - o)) / engine.stage2.fps, lookahead=False)
    engine.state.started = True
    run(engine.state)


def _timeit(fn, dev, repeat=3) -> float:
    fn()
    _sync(dev)
    best = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best.append(time.perf_counter() - t0)
    return sorted(best)[len(best) // 2]


@torch.inference_mode()
def engine_stage_costs(engine, m: dict, args) -> dict:
    """Seconds per frame set of each engine stage run alone at the stream's shapes (module docstring)."""
    from mvportrait.data.multiview import geometry_maps, rig_cameras
    from mvportrait.drivers.text import split_prompt
    from mvportrait.render.renderer import render

    pipe, t2f, dev = engine.stage2, engine.stage1, m["dev"]
    model = pipe.model
    w, o = pipe.window, pipe.overlap
    hop = w - o
    b = engine.settings.stream_batch
    parts = split_prompt(args.prompt)
    out = {}
    t0 = time.perf_counter()  # text: a prompt the encoder has not cached
    t2f.encode([parts.motion + " again"], [parts.emotion + " again"])
    out["text"] = time.perf_counter() - t0
    m_text, e_text = t2f.encode([parts.motion], [parts.emotion])

    def stage1():
        for model1, text in ((t2f.motion_model, m_text), (t2f.emotion_model, e_text)):
            cond, uncond = t2f.text_pair(model1, text)
            t2f.sample_window(model1, cond, uncond, steps=m["stage1_steps"], guidance=m["stage1_guidance"],
                              generator=torch.Generator().manual_seed(0))

    s1_frames = (t2f.window - t2f.overlap) * pipe.fps / t2f.model_fps  # output frames per stage-1 window
    out["stage1"] = _timeit(stage1, dev) / s1_frames
    fp = _zero_flame(hop, pipe.fps)
    cams = rig_cameras(f"ring-{args.views}", model.config.image_size, device=dev)
    out["lbs"] = _timeit(lambda: pipe.flame(fp.to(dev), with_landmarks=False), dev) / hop
    verts = pipe.flame(fp.to(dev), with_landmarks=False).vertices.float()
    out["raster"] = _timeit(lambda: geometry_maps(render(verts, pipe.flame.faces, cams,
                                                         modes=("normal", "depth", "mask"))), dev) / hop
    maps = torch.zeros(1, args.views, w, model.config.unet.flame_channels, model.config.image_size,
                       model.config.image_size, device=dev, dtype=pipe.dtype)
    new_maps = maps[:, :, :hop]  # the stream encodes a window's new frames (the overlap keeps its features)
    out["flame_encoder"] = _timeit(lambda: model.encode_renders(new_maps), dev) / hop
    ctx = pipe.prepare(m["reference"])
    feats = model.encode_renders(maps)
    feats = feats.expand(b, *feats.shape[1:]).contiguous()
    x = torch.randn(model.latent_shape(b, views=args.views, frames=w), device=dev, dtype=pipe.dtype)
    pairs = pipe.sampler.timestep_pairs(engine.settings.steps)
    t_step = torch.tensor([pairs[i % len(pairs)][0] for i in range(b)])  # the rows at their own steps
    p_step = torch.tensor([pairs[i % len(pairs)][1] for i in range(b)])
    t_model = t_step.to(dev)

    def unet():
        y = model.denoise(x, t_model, feats, ctx, guidance=m["guidance"])
        pipe.sampler.step(y, t_step, x, prev_t=p_step, noise=torch.zeros_like(x))

    out["unet"] = _timeit(unet, dev) / hop  # one call advances B windows a step: H new frames per call
    lat = x[0, :, 0]  # the stream decodes one frame (all views) per call
    out["decode"] = _timeit(lambda: pipe.decoder.decode(lat), dev)
    return out


def _profile(dev, fn, rows: int = 15, by: str = "device") -> str:
    """torch.profiler table of ``fn`` (host + device activity), sorted by self device time on a GPU
    (``by="cpu"``: by self host time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=acts) as prof:
        fn()
        _sync(dev)
    avgs = prof.key_averages()
    key = "self_cpu_time_total"
    if dev.type == "cuda" and by != "cpu":
        key = "self_device_time_total" if avgs and hasattr(avgs[0], "self_device_time_total") \
            else "self_cuda_time_total"
    return avgs.table(sort_by=key, row_limit=rows)


# ------------------------------------------------------------------------------------ driver
def _names(args) -> tuple[str, str]:
    """(prefix, kind): e2e | e2e_sd15 | e2e_micro, cpu | gpu."""
    prefix = "e2e" + ("" if args.preset == "tiny" else "_" + args.preset)
    return prefix, "gpu" if _device(args).type == "cuda" else "cpu"


def _out_path(args, dev=None) -> Path:
    prefix, kind = _names(args)
    return Path(args.out) if args.out else RESULTS / f"{prefix}_{kind}.json"


def _profile_path(args) -> Path | None:
    if args.profile == "none":
        return None
    if args.profile:
        return Path(args.profile)
    prefix, kind = _names(args)
    if args.out:  # beside --out, named after it: e2e_sd15_cl_gpu.json -> e2e_sd15_cl_profile_gpu.txt
        stem = Path(args.out).stem
        prefix = stem[:-len(kind) - 1] if stem.endswith("_" + kind) else stem
    return _out_path(args).parent / f"{prefix}_profile_{kind}.txt"


def _measure(args, which: str) -> dict:
    m = load_models(args, which)
    result = run_naive(args, m) if which == "naive" else run_engine(args, m)
    result.update(load_s=m["load_s"], model=m["note"], engine_model=m["engine_note"], stage1=m["stage1_note"],
                  decoder="full" if which == "naive" else m["engine"].decoder_kind,
                  channels_last=False if which == "naive" else m["engine"].channels_last,
                  window=m["window"], overlap=m["overlap"], image_size=m["image_size"], fps_model=m["fps_model"],
                  dtype=str(m["dtype" if which == "naive" else "engine_dtype"]).replace("torch.", ""))
    return result


def _measure_isolated(args, which: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "args.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"args": vars(args), "which": which, "out": str(out)}, default=str))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                           os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec)], env=env)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the {which} benchmark process failed (exit {proc.returncode}); see its output above")
        result = json.loads(out.read_text())
    result["ru_maxrss_mb"] = result.get("ru_maxrss_mb")
    return result


def _child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    args = argparse.Namespace(**spec["args"])
    result = _measure(args, spec["which"])
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def make_rows(args, dev, res: dict) -> list[dict]:
    """Harness rows of both pipelines, the ratios and the gaps to the issue's targets."""
    tgt = TARGETS["cuda" if dev.type == "cuda" else "cpu"]
    any_res = next(iter(res.values()))
    base = {"preset": args.preset, "model": any_res["model"], "views": args.views, "image_size": any_res["image_size"],
            "frames": args.frames, "window": any_res["window"], "overlap": any_res["overlap"],
            "model_fps": any_res["fps_model"], "dtype": any_res["dtype"], "threads": torch.get_num_threads(),
            "isolated": not args.no_isolate, "load_avg_1m": round(os.getloadavg()[0], 2), "prompt": args.prompt,
            "text_encoder": args.text_model or "default (MiniLM)",
            "kernels": os.environ.get("MVP_KERNELS", "auto")}
    rows = []
    name = f"e2e_{args.preset}"
    for which, r in res.items():
        backend = "naive (torch eager)" if which == "naive" else f"engine ({args.backend})"
        cfg = dict(base, pipeline=which, steps=r["steps"], stage1_steps=r["stage1_steps"], guidance=r["guidance"],
                   dtype=r["dtype"], decoder=r.get("decoder", "full"), channels_last=r.get("channels_last", False))
        if which == "engine":
            cfg.update(engine_model=r["engine_model"], stage1_model=r["stage1"], stream_batch=r["stream_batch"],
                       first_window=r.get("first_window") or getattr(args, "first_window", None) or r["window"],
                       prefetch=r.get("prefetch"),
                       mean_batch=round(r["mean_batch"], 2))
        else:
            cfg.update(stage1_model="teacher (DDIM, guidance as two calls)")
        first = dict(cfg)
        fps_cfg = dict(cfg)
        if which == "engine":
            first.update(target_s=tgt["first_frame_s"], vs_target=round(r["first_frame_s"] / tgt["first_frame_s"], 2),
                         first_frame_parts_ms={k: round(v * 1e3, 1) for k, v in r["first_parts"].items()})
            if r.get("first_synced"):
                first["first_frame_synced_ms"] = {k: round(v * 1e3, 1) for k, v in r["first_synced"].items()}
            if r.get("first_frame_prepared_reference_s"):
                first["first_frame_prepared_reference_s"] = round(r["first_frame_prepared_reference_s"], 4)
            if r["fps"]:
                fps_cfg.update(target_fps=tgt["fps"], vs_target=round(r["fps"] / tgt["fps"], 4))
            # what the stream's own frames reported (host clocks, window costs shared by its frames)
            fps_cfg["stream_frame_timings_ms"] = {k: round(v * 1e3, 1) for k, v in r["frame_timings"].items()}
            fps_cfg["prepare_s"] = round(r["prepare_s"], 3)
        rows.append(row(name, backend, "first_frame", "s", [r["first_frame_s"]], first))
        if r["fps"]:
            rows.append(row(name, backend, "fps", "frame sets/s", [r["fps"]], fps_cfg))
        mem_cfg = dict(cfg, memory="cuda max allocated" if dev.type == "cuda" else "peak RSS during the run")
        rows.append(row(name, backend, "peak_memory", "MB", [r["peak_mb"]], mem_cfg))
        how = "inline clocks" if which == "naive" else "each stage alone at the stream's shapes"
        for stage, v in r["stages"].items():
            unit = "s/stream" if stage == "text" else "s/frame set"
            rows.append(row(name, backend, f"stage:{stage}", unit, [v], dict(cfg, method=how)))
    if "naive" in res and "engine" in res:
        n, e = res["naive"], res["engine"]
        ratio_cfg = dict(base, target=tgt["speedup"], naive_steps=n["steps"], engine_steps=e["steps"],
                         engine_model=e["engine_model"], backend=args.backend)
        if n["fps"] and e["fps"]:
            s = e["fps"] / n["fps"]
            rows.append(row(name, "engine/naive", "speedup_fps", "x", [s],
                            dict(ratio_cfg, vs_target=round(s / tgt["speedup"], 3))))
        s = n["first_frame_s"] / e["first_frame_s"]
        rows.append(row(name, "engine/naive", "speedup_first_frame", "x", [s], ratio_cfg))
    return rows


def _summary(res: dict, dev) -> str:
    tgt = TARGETS["cuda" if dev.type == "cuda" else "cpu"]
    lines = []
    for which, r in res.items():
        fps = f"{r['fps']:.3g}" if r["fps"] else "-"
        st = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sorted(r["stages"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{which:>6}: first frame {r['first_frame_s']:.2f} s, {fps} frame sets/s, "
                     f"peak {r['peak_mb']:.0f} MB"
                     f" | per frame set: {st}")
    if "naive" in res and "engine" in res and res["naive"]["fps"] and res["engine"]["fps"]:
        s = res["engine"]["fps"] / res["naive"]["fps"]
        lines.append(f"engine/naive: {s:.1f}x fps (target {tgt['speedup']:g}x), first frame "
                     f"{res['naive']['first_frame_s'] / res['engine']['first_frame_s']:.1f}x")
    if "engine" in res and res["engine"]["fps"]:
        e = res["engine"]
        lines.append(f"engine vs target: {e['fps']:.3g} / {tgt['fps']:g} fps ({e['fps'] / tgt['fps']:.1%}), first "
                     f"frame {e['first_frame_s']:.2f} s / {tgt['first_frame_s']:g} s")
    if "engine" in res and res["engine"].get("first_parts"):
        parts = ", ".join(f"{k[:-2]} {v * 1e3:.0f} ms" for k, v in res["engine"]["first_parts"].items())
        lines.append(f"engine first frame (host clocks; on a GPU a stage's kernels may finish in a later stage's "
                     f"clock): {parts}")
    if "engine" in res and res["engine"].get("first_frame_prepared_reference_s"):
        lines.append(f"engine first frame with the portrait's reference context prepared beforehand: "
                     f"{res['engine']['first_frame_prepared_reference_s']:.2f} s")
    if "engine" in res and res["engine"].get("first_synced"):
        parts = ", ".join(f"{k[:-2]} {v * 1e3:.0f} ms" for k, v in res["engine"]["first_synced"].items())
        lines.append(f"engine first frame on the stream worker thread, device synchronised after each part: {parts}")
    return "\n".join(lines)


def run(args) -> int:
    """Measure the pipelines ``args.only`` selects, write the rows and the profile; print a summary."""
    check_e2e_args(args)
    dev = _device(args)
    which = ("naive", "engine") if args.only == "both" else (args.only,)
    res = {}
    out = _out_path(args, dev)
    for w in which:  # rows written after each pipeline: a run cut short keeps what it measured
        print(f"== {w} ...", flush=True)
        res[w] = _measure(args, w) if args.no_isolate else _measure_isolated(args, w)
        rows = make_rows(args, dev, res)
        path = write(rows, out.name, folder=out.parent)
    prof = _profile_path(args)
    if prof is not None:
        text = [f"# torch.profiler top ops ({dev.type}), {rows[0]['device']}, git {rows[0]['git_sha']}",
                f"# preset {args.preset}, {args.views} views x {res[which[0]]['image_size']} px"]
        for w in which:
            what = ("engine: a short stream run synchronously (stage 1 inline), steady state included"
                    if w == "engine" else "naive: one window at 2 DDIM steps (the per-step op mix of 25)")
            text += ["", f"## {what}", res[w].get("profile", "(not profiled)")]
            if w == "engine":
                text += ["", "## engine: window 0's first model call of a new stream (on the worker thread, sorted by "
                         "self host time)", res[w].get("profile_first_call", "(not profiled)")]
        prof.parent.mkdir(parents=True, exist_ok=True)
        prof.write_text("\n".join(text) + "\n")
    print(_summary(res, dev))
    print(f"wrote {path}" + (f" and {prof}" if prof is not None else ""))
    return 0


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 2 and argv[0] == "--child":
        return _child(argv[1])
    p = add_e2e_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run(args)
    except ValueError as e:
        print(f"bench_e2e: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
