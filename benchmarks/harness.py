"""Shared benchmark harness: time a callable, write rows to benchmarks/results/*.json.

Row: name, backend, metric, unit, p50, p90, config, device, versions, git_sha. The README's
tables are generated from these files (``python benchmarks/harness.py --table``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    isa = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                # the widest vector ISA: one "model name" (e.g. "AMD EPYC") covers hosts with and without
                # AVX-512 / bfloat16 kernels, 2-4x apart on the engine's CPU rows
                flags = set(line.split(":", 1)[1].split())
                isa = ("AVX-512 + AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags
                       else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "")
                break
    except OSError:
        pass
    return f"CPU: {cpu}{f' ({isa})' if isa else ''}, {torch.get_num_threads()} threads"


def versions() -> dict:
    import torch

    import mvportrait

    return {"python": platform.python_version(), "torch": torch.__version__, "mvportrait": mvportrait.__version__}


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/results"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timeit(fn, *, warmup: int = 2, repeat: int = 10, sync=None) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls after ``warmup`` calls (``sync`` runs after each)."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return out


def row(name, backend, metric, unit, samples, config) -> dict:
    s = sorted(samples)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return {"name": name, "backend": backend, "metric": metric, "unit": unit, "p50": statistics.median(s),
            "p90": p90, "n": len(s), "config": config, "device": device_name(), "versions": versions(),
            "git_sha": git_sha()}


def write(rows: list[dict], filename: str, folder: Path | None = None) -> Path:
    """Write ``rows`` to ``folder / filename`` (default folder: benchmarks/results), atomically."""
    folder = RESULTS if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(path)
    return path


def table(paths=None) -> str:
    """Markdown table of every results file (end-to-end rows: only the headline metrics; their full
    breakdown is :func:`e2e_table`)."""
    lines = ["| benchmark | backend | metric | p50 | p90 | config | device | git |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(paths or RESULTS.glob("*.json")):
        data = json.loads(Path(p).read_text())
        if not isinstance(data, list):  # an evaluation report (e.g. stage2_eval.json), not timing rows
            continue
        for r in data:
            if r["name"].startswith("e2e_") and r["metric"].startswith("stage:"):
                continue
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
            lines.append(f"| {r['name']} | {r['backend']} | {r['metric']} ({r['unit']}) | {r['p50']:.4g} | "
                         f"{r['p90']:.4g} | {cfg} | {r['device']} | {r['git_sha']} |")
    return "\n".join(lines)


E2E_STAGES = ("text", "stage1", "lbs", "raster", "flame_encoder", "reference", "unet", "decode", "other")


def e2e_table(paths=None) -> str:
    """Markdown table of the end-to-end results (``e2e*.json``): one line per pipeline, the ratio line,
    then the conditions. Stage columns are milliseconds per frame set (all views); text per stream."""
    head = ("| run | pipeline | first frame (s) | frame sets/s | peak MB | "
            + " | ".join(("text (ms/stream)" if s == "text" else f"{s} (ms)") for s in E2E_STAGES) + " |")
    lines = [head, "|" + "---|" * (5 + len(E2E_STAGES))]
    notes = []
    for p in sorted(paths or RESULTS.glob("e2e*.json")):
        data = json.loads(Path(p).read_text())
        if not isinstance(data, list) or not data:
            continue
        run = Path(p).stem
        by = {}
        for r in data:
            by.setdefault(r["backend"], {})[r["metric"]] = r
        for backend, m in by.items():
            if backend == "engine/naive":
                sp = m.get("speedup_fps")
                ff = m.get("speedup_first_frame")
                lines.append(f"| {run} | **engine / naive** | {ff['p50']:.1f}x faster | "
                             f"{sp['p50']:.1f}x (target {sp['config']['target']:g}x) | | "
                             + " | ".join("" for _ in E2E_STAGES) + " |" if sp and ff else f"| {run} | ratio | | | |")
                continue
            get = lambda k, scale=1.0, fmt=".3g": (f"{m[k]['p50'] * scale:{fmt}}" if k in m else "-")  # noqa: E731
            stages = " | ".join(get(f"stage:{s}", 1e3, ".0f") for s in E2E_STAGES)
            lines.append(f"| {run} | {backend} | {get('first_frame')} | {get('fps')} | {get('peak_memory', 1, '.0f')} "
                         f"| {stages} |")
            c = m["first_frame"]["config"]
            what = (f"{c.get('engine_model', '')}, stage 1 {c.get('stage1_model', '')}" if "engine_model" in c
                    else "teacher, guidance as two calls")
            notes.append(f"{run} / {backend}: {c['views']} views x {c['image_size']} px, {c['frames']} frames "
                         f"(window {c['window']}, overlap {c['overlap']}), {c['steps']} stage-2 steps, "
                         f"{c['stage1_steps']} stage-1 steps, guidance {c['guidance']:g}, {what}; {c['dtype']}, "
                         f"kernels {c.get('kernels', 'auto')}, {c['threads']} threads, {m['first_frame']['device']}, "
                         f"git {m['first_frame']['git_sha']}")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--table", action="store_true", help="print the markdown table of all results")
    ap.add_argument("--e2e-table", action="store_true", help="print the end-to-end table (e2e*.json)")
    args = ap.parse_args()
    if args.table:
        print(table())
    if args.e2e_table:
        print(e2e_table())
