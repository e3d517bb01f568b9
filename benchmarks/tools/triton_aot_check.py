"""Ahead-of-time compile check of every Triton kernel specialisation for an sm_90 GPU, without a GPU.

    python benchmarks/tools/triton_aot_check.py [--arch 90] [--quick] [--keep-records FILE]

Phase 1 (a subprocess with ``TRITON_INTERPRET=1``): runs the public entry points that dispatch to
Triton (``lbs`` + ``vertex_normals``, ``axis_attention``, ``rasterize_triton`` + ``normal_map_triton``
/ ``interpolate_triton``) at small shapes (executed by the interpreter) and at the engine's real
shapes (launch recorded, grid not executed), for every supported dtype and flag, and records every
launch: kernel, argument kinds (tensor dtype + 16-byte alignment, int value, float), constexprs and
launch options (num_warps, num_stages, enable_fp_fusion, ...). The module-level ``launcher`` of
each kernel module is wrapped for that, so the wrappers' real launch code is what is recorded.

The wrappers pick some constexprs by device type (``dev.type == "cuda"``); under the interpreter
the tensors are CPU tensors, so the CPU values would be recorded. ``GPU_OVERRIDES`` replaces those
by the CUDA branch's values (keep it in sync with ``rasterize_triton.py``); the rasterizer's tile
knobs are passed explicitly (the GPU defaults of ``_defaults`` and the ``--raster-sweep`` configs).

Phase 2 (this process, ``TRITON_INTERPRET=0``): for each recorded launch the JIT's own binder
(``create_function_from_signature`` with a CUDA backend for ``GPUTarget("cuda", arch, 32)``)
computes the specialisation exactly as a GPU launch would (ints equal to 1 become constexprs,
ints divisible by 16 and 16-byte aligned pointers get the ``D`` attribute), then
``triton.compile(ASTSource(...))`` compiles it down to a cubin with the wheel's ptxas. Each kernel
is also compiled once with every int argument set to 1, to 4096 and to 17 (the JIT specialises
them differently; the real sizes vary). Registers / local memory (spills) come from ``cuobjdump
-res-usage`` on the cubin, shared memory from the kernel metadata.

Prints one row per distinct specialisation; exits 1 if any compile fails (alarms -- spills,
shared memory over 228 KB, 255 registers -- are printed but do not fail the check).
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODULES = ("mvportrait.kernels.lbs", "mvportrait.kernels.axis_attention", "mvportrait.kernels.rasterize_triton",
           "mvportrait.kernels.group_norm")

# constexprs the wrappers choose as ``X if dev.type == "cuda" else Y``: the CUDA branch's values
GPU_OVERRIDES = {
    "_raster_setup_kernel": lambda kw: {"BLOCK": 128, "VBLOCK": 4 * 128},
    "_raster_bin_kernel": lambda kw: {"BLOCK": 128},
    "_raster_count_kernel": lambda kw: {"BLOCK": 128},
    "_interpolate_kernel": lambda kw: {"BLOCK_P": max(16, 1024 // kw["BLOCK_C"])},
}
SMEM_LIMIT = 228 * 1024


# ----------------------------------------------------------------------------- phase 1: record
def _enc(a):
    import torch

    if isinstance(a, torch.Tensor):
        return ("tensor", str(a.dtype).split(".")[1], a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("bool", a)
    if isinstance(a, int):
        return ("int", a)
    if isinstance(a, float):
        return ("float", a)
    if a is None:
        return ("none",)
    raise TypeError(f"unsupported kernel argument {type(a).__name__}")


def record(out_path: str, quick: bool):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    from mvportrait.kernels import _triton
    from mvportrait.kernels import axis_attention as A
    from mvportrait.kernels import group_norm as G
    from mvportrait.kernels import lbs as L
    from mvportrait.kernels import rasterize_triton as R

    records = []
    state = {"execute": True, "label": ""}
    orig = _triton.launcher

    def rec_launcher(kernel, device, op):
        real = orig(kernel, device, op)

        class Proxy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    kw = dict(kwargs)
                    if kernel.__name__ in GPU_OVERRIDES:
                        kw.update(GPU_OVERRIDES[kernel.__name__](kw))
                    records.append({"module": kernel.__module__, "kernel": kernel.__name__,
                                    "args": [_enc(a) for a in args], "kwargs": kw,
                                    "grid": tuple(grid), "label": state["label"]})
                    if state["execute"]:
                        return real[grid](*args, **kwargs)
                    return None
                return launch
        return Proxy()

    for m in (L, A, R, G):
        m.launcher = rec_launcher
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    g = torch.Generator().manual_seed(0)

    # --- LBS + vertex normals
    def lbs_case(n, nv, k, faces, dtype, trans, execute, label):
        nj = 5
        state.update(execute=execute, label=label)
        v_t = torch.randn(nv, 3, generator=g).to(dtype)
        dirs = (torch.randn(nv, 3, k, generator=g) * 0.01).to(dtype)
        pdirs = (torch.randn(nv, 3, 9 * (nj - 1), generator=g) * 0.01).to(dtype)
        jr = torch.softmax(torch.randn(nj, nv, generator=g), -1).to(dtype)
        par = torch.tensor([-1, 0, 1, 1, 1])
        w = torch.softmax(torch.randn(nv, nj, generator=g), -1).to(dtype)
        c = torch.randn(n, k, generator=g).to(dtype)
        pose = (torch.randn(n, 3 * nj, generator=g) * 0.3).to(dtype)
        tr = torch.randn(n, 3, generator=g).to(dtype) if trans else None
        L.lbs(c, pose, v_t, dirs, pdirs, jr, par, w, tr, faces=faces, impl="triton")

    small_faces = torch.randint(0, 40, (60, 3), generator=g)
    from mvportrait.flame.synthetic import synthetic_head

    head = synthetic_head(0, flame_size=True).model
    nv_real, faces_real = head.n_vertices, head.faces
    for dt in dtypes:
        for trans in (True, False):
            lbs_case(3, 40, 20, small_faces, dt, trans, True, "lbs small")
        for n in (1, 64):
            lbs_case(n, nv_real, 400, faces_real, dt, True, False, f"lbs FLAME N={n}")
        lbs_case(17, nv_real, 100, faces_real, dt, False, False, "lbs FLAME N=17 K=100")

    # --- axis attention: (B, V, F, N, C) slices of a fused qkv, real head dims and axis lengths
    def attn_case(shape, heads, axis, dtype, execute, label):
        state.update(execute=execute, label=label)
        c = shape[4]
        qkv = torch.randn(*shape[:4], 3 * c, generator=g).to(dtype)
        q, k, v = qkv.split(c, dim=-1)
        A.axis_attention(q, k, v, heads, axis, impl="triton")

    for dt in dtypes:
        attn_case((1, 3, 2, 5, 24), 2, "view", dt, True, "attn small")
        attn_case((1, 2, 5, 3, 40), 1, "frame", dt, True, "attn small")
    # UNet levels: 320/640/1280 channels, 8 heads (D 40/80/160); head_dim presets 32/64/128
    chans = [(320, 8), (640, 8), (1280, 8), (128, 4), (256, 4), (512, 4), (64, 2)]
    lengths = (2, 4, 8, 16, 32) if not quick else (4, 16)
    for dt in (dtypes if not quick else (torch.float16,)):
        for c, h in chans:
            for ln in lengths:
                attn_case((1, ln, 1, 64, c), h, "view", dt, False, f"attn C={c} H={h} L={ln}")
    if not quick:  # the frame axis with non-contiguous strides once per head dim
        for c, h in chans[:3]:
            attn_case((2, 4, 16, 256, c), h, "frame", torch.float16, False, f"attn frame C={c}")

    # --- GroupNorm (+ SiLU): small shapes executed, the UNet's levels recorded (window 8 and a 3-frame first
    # window of 4 views: 32 / 12 images), the autoencoder's decoder at 512^2 (one frame of 4 views)
    def gn_case(shape, groups, dtype, silu, execute, label):
        state.update(execute=execute, label=label)
        x = torch.randn(*shape, generator=g).to(dtype) if execute else torch.empty(shape, dtype=dtype)
        wt, bs = torch.randn(shape[1], generator=g).to(dtype), torch.randn(shape[1], generator=g).to(dtype)
        G.group_norm(x, groups, wt, bs, 1e-5, silu=silu, impl="triton")

    for dt in dtypes:
        for silu in (True, False):
            gn_case((2, 6, 5, 7), 3, dt, silu, True, "gn small")
            gn_case((1, 8, 9), 4, dt, silu, True, "gn small 1-D")
    gn_shapes = [(nb, c, hw, hw) for nb in (32, 12) for c, hw in ((320, 64), (640, 32), (1280, 16), (1280, 8))]
    gn_shapes += [(4, 512, 64, 64), (4, 256, 256, 256), (4, 128, 512, 512), (32, 320, 4096)]
    for dt in ((torch.bfloat16, torch.float32) if not quick else (torch.bfloat16,)):
        for shape in gn_shapes:
            for silu in (True, False):
                gn_case(shape, 32, dt, silu, False, f"gn {shape}")

    # --- rasterizer + normal map / interpolate, executed on a small scene with the GPU knobs
    import torch.nn.functional as F

    gpu_tile, gpu_bt, gpu_w = R._defaults(torch.device("cuda"), None, None, None)
    configs = [(gpu_tile, gpu_bt, gpu_w)]
    configs += [(8, b, w) for b in (1, 2) for w in (1, 2, 4)] + [((8, 16), b, w) for b in (1, 2) for w in (2, 4)]
    configs += [(16, 2, 4), (16, 2, 8)]
    if quick:
        configs = configs[:1]
    n, h, w, nvr = 2, 20, 24, 30
    uv = torch.rand(n, nvr, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64)
    z = 1 + torch.rand(n, nvr, 1, generator=g, dtype=torch.float64)
    pix64 = torch.cat([uv, z], -1)
    faces = torch.randint(0, nvr, (25, 3), generator=g)
    state.update(execute=True)
    for ci, (tile, bt, nw) in enumerate(configs):
        for dt in dtypes + (torch.float64,):
            for cull in (True, False):
                for fdt in (torch.int64, torch.int32):
                    state["label"] = f"raster tile={tile} bt={bt} w={nw}"
                    if ci and (dt != torch.float32 or not cull or fdt != torch.int64):
                        continue  # every dtype / flag with the default config, the sweep configs in float32
                    R.rasterize_triton(pix64.to(dt), faces.to(fdt), h, w, cull_backfaces=cull, tile=tile,
                                               block_t=bt, num_warps=nw)
    for dt in dtypes + (torch.float64,):  # the counting bin (binning="count": count / scatter kernel, no permutation)
        for cull in (True, False):
            state["label"] = f"raster countbin {dt} cull={cull}"
            R.rasterize_triton(pix64.to(dt), faces, h, w, cull_backfaces=cull, tile=gpu_tile, block_t=gpu_bt,
                               num_warps=gpu_w, binning="count")
    for dt in dtypes + (torch.float64,):
        state["label"] = f"raster default {dt}"
        frags = R.rasterize_triton(pix64.to(dt), faces, h, w, tile=gpu_tile, block_t=gpu_bt, num_warps=gpu_w)
        state["label"] = "normal_map"
        R.normal_map_triton(F.normalize(torch.randn(n, nvr, 3, generator=g), dim=-1).to(dt), faces, frags)
        for c in (1, 3, 5):
            state["label"] = f"interpolate C={c}"
            R.interpolate_triton(torch.randn(n, nvr, c, generator=g).to(dt), faces, frags)
    with open(out_path, "wb") as f:
        pickle.dump(records, f)
    print(f"recorded {len(records)} launches", file=sys.stderr)


# ---------------------------------------------------------------------------- phase 2: compile
def _dec(e):
    import torch

    if e[0] == "tensor":
        t = torch.empty(64, dtype=getattr(torch, e[1]))
        return t if e[2] else t[1:]  # a 1-element offset is never 16-byte aligned
    if e[0] == "none":
        return None
    return e[1]


def _resources(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    res = {}
    for k in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{k}:(\d+)", out)
        res[k] = int(m.group(1)) if m else -1
    return res


def compile_all(records, arch: int):
    import triton
    import triton.language as tl
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as tcompile
    from triton.runtime.jit import JITFunction, create_function_from_signature

    import importlib

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cuobjdump = str(bindir / "cuobjdump")
    jits, binders = {}, {}

    def jit_of(mod, name):
        if (mod, name) not in jits:
            m = importlib.import_module(mod)
            fn = getattr(m, name)
            fn.__globals__.update(triton=triton, tl=tl)
            jf = JITFunction(fn)
            jits[(mod, name)] = jf
            binders[(mod, name)] = create_function_from_signature(jf.signature, jf.params, backend)
        return jits[(mod, name)], binders[(mod, name)]

    # int-argument variants, once per (kernel, constexprs, dtypes)
    jobs, seen_variant = [], set()
    for r in records:
        jobs.append((r, r["args"], r["label"]))
        base = (r["kernel"], tuple(sorted((k, str(v)) for k, v in r["kwargs"].items())),
                tuple(a for a in r["args"] if a[0] == "tensor"))
        if base not in seen_variant:
            seen_variant.add(base)
            for val in (1, 4096, 17):
                args = [("int", val) if a[0] == "int" else a for a in r["args"]]
                jobs.append((r, args, f"{r['label']} [all ints={val}]"))

    rows, done, failed = [], {}, 0
    for r, args, label in jobs:
        jf, binder = jit_of(r["module"], r["kernel"])
        kwargs = dict(r["kwargs"])
        kwargs.setdefault("debug", False)
        if hasattr(knobs.compilation, "instrumentation_mode"):
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound, spec, opts = binder(*[_dec(a) for a in args], **kwargs)
        key = (r["kernel"], str(spec), str(opts))
        if key in done:
            continue
        options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound, spec, opts)
        cx = {jf.arg_names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
        ptrs = sorted({v for v in signature.values() if v.startswith("*")})
        desc = (" ".join(f"{k}={v}" for k, v in cx.items() if k.isupper())
                + f" ptr={','.join(p[1:] for p in ptrs)} w={options.num_warps} s={options.num_stages}"
                + ("" if options.enable_fp_fusion else " nofma"))
        ones = [k for k, v in cx.items() if not k.isupper()]
        t0 = time.perf_counter()
        try:
            k = tcompile(ASTSource(jf, signature, constexprs, attrs), target=target, options=options.__dict__)
            res = _resources(k.asm["cubin"], cuobjdump)
            smem = int(k.metadata.shared)
            alarms = []
            if res["LOCAL"] > 0 or res["STACK"] > 0:
                alarms.append(f"local/spill {res['LOCAL']}B stack {res['STACK']}B")
            if smem > SMEM_LIMIT:
                alarms.append(f"smem {smem} > {SMEM_LIMIT}")
            if res["REG"] >= 255:
                alarms.append("255 regs")
            row = dict(kernel=r["kernel"], spec=desc, ones=ones, status="ok", regs=res["REG"], local=res["LOCAL"],
                       stack=res["STACK"], smem=smem, alarms="; ".join(alarms), label=label,
                       secs=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 -- report every failure
            failed += 1
            msg = " ".join(str(e).split())[:400]
            row = dict(kernel=r["kernel"], spec=desc, ones=ones, status=f"FAIL {type(e).__name__}: {msg}", regs=-1,
                       local=-1, stack=-1, smem=-1, alarms="", label=label, secs=time.perf_counter() - t0)
        done[key] = row
        rows.append(row)
        print(f"{row['kernel']:24s} {row['spec']:60s} {row['status'][:8]:8s} regs={row['regs']:4d} "
              f"local={row['local']:5d} stack={row['stack']:4d} smem={row['smem']:7d} {row['secs']:5.1f}s "
              f"{row['label']}" + (f"  !! {row['alarms']}" if row["alarms"] else "")
              + ("" if row["status"] == "ok" else f"\n    {row['status']}"), flush=True)
    return rows, failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    ap.add_argument("--quick", action="store_true", help="fewer shapes / tile configs")
    ap.add_argument("--keep-records", help="write (or reuse, if it exists) the recorded launches here")
    ap.add_argument("--_record", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._record:
        record(args._record, args.quick)
        return 0
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mvp_triton_aot_cache"))
    path = args.keep_records or os.path.join(tempfile.mkdtemp(), "records.pkl")
    if not (args.keep_records and os.path.exists(path)):
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, __file__, "--_record", path] + (["--quick"] if args.quick else [])
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, cwd=ROOT)
        print(f"recording took {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    with open(path, "rb") as f:
        records = pickle.load(f)
    os.environ["TRITON_INTERPRET"] = "0"  # before the first import of triton in this process
    rows, failed = compile_all(records, args.arch)
    alarms = [r for r in rows if r["alarms"]]
    print(f"\n{len(rows)} specialisations for sm_{args.arch}: {len(rows) - failed} ok, {failed} FAILED, "
          f"{len(alarms)} with alarms")
    for kname in sorted({r["kernel"] for r in rows}):
        rs = [r for r in rows if r["kernel"] == kname and r["regs"] >= 0]
        if rs:
            print(f"  {kname:24s} regs {min(r['regs'] for r in rs)}-{max(r['regs'] for r in rs)}, "
                  f"max local {max(r['local'] for r in rs)}B, max smem {max(r['smem'] for r in rs)}B")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
