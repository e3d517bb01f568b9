"""benchmarks/gpu_suite.sh runs once per lent GPU with no second try, so its control flow is checked here
with a stand-in `python` (PYTHON=...) that logs each call: phase 1 (training jobs in the background beside
the tests), then the benchmarks only after the training jobs finished, the fall-back end-to-end run on the
reference kernels, and the archives that come back under $OUT."""
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")

FAKE = r"""#!/bin/bash
echo "$(date +%s.%N) START $* kernels=${MVP_KERNELS:-auto}" >> "$CALLS"
[ "$1" = "-" ] && { cat > /dev/null; echo "env ok"; exit 0; }
case "$*" in
  *"train stage2"*) out=$(echo "$*" | sed 's/.*--out \([^ ]*\).*/\1/'); mkdir -p "$out/final" "$out/spatial"
                    echo '{}' > "$out/final/config.json"; echo x > "$out/spatial/checkpoint.safetensors"; sleep 2 ;;
  *"distill stage2"*) out=$(echo "$*" | sed 's/.*--out \([^ ]*\).*/\1/'); mkdir -p "$out/student" "$out/unet"
                      echo x > "$out/unet/checkpoint.safetensors"; echo x > "$out/student/model.safetensors"; sleep 1 ;;
  *pytest*) sleep 1 ;;
  *"--preset sd15"*) [ "${MVP_KERNELS:-}" = ref ] || { echo "$(date +%s.%N) END $*" >> "$CALLS"; exit 1; } ;;
esac
echo "$(date +%s.%N) END $* kernels=${MVP_KERNELS:-auto}" >> "$CALLS"
exit 0
"""


def _run_suite(tmp_path, *options, **env_extra):
    """The suite with the stand-in python: (process, its output, the calls log, the $OUT folder)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls.log"
    out.mkdir()
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), CALLS=str(calls), GPU_SUITE_BUDGET_S="120",
               MVP_TEXT_MODEL=str(tmp_path / "no-minilm"), **env_extra)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_suite.sh"), *options], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, proc.stdout + proc.stderr, calls, out


def test_suite_order_fallback_and_archives(tmp_path):
    proc, log, calls, out = _run_suite(tmp_path, "--train")
    assert proc.returncode == 1, log  # the sd15 run failed once (then passed on the reference kernels)
    lines = [ln.split(" ", 2) for ln in calls.read_text().splitlines()]
    events = [(float(t), kind, rest) for t, kind, rest in lines]

    def when(kind, needle):
        return [t for t, k, rest in events if k == kind and needle in rest]

    # training jobs start before the tests finish, and every benchmark starts after both jobs ended
    train_end = max(when("END", "train stage2") + when("END", "distill stage2"))
    assert min(when("START", "train stage2")) < max(when("END", "pytest tests/kernels"))
    for bench in ("bench_kernels.py", "bench_e2e.py"):
        assert min(when("START", bench)) > train_end
    assert when("START", "--text-model hashing")  # no MiniLM folder: the hashing encoder
    # the failed sd15 run is retried once on the reference kernels; tiny passes on the first try
    main_sd15 = "--steps 1 --device cuda"  # the full sd15 run (the tiny-decoder run ends in --out ...)
    assert len(when("START", main_sd15)) == 2 and when("END", main_sd15) and \
        any("kernels=ref" in rest for _, k, rest in events if k == "END" and main_sd15 in rest)
    tiny_dec = [rest for t, k, rest in events if k == "START" and "--decoder tiny" in rest]
    assert tiny_dec and all("--only engine" in r and "e2e_sd15_tinydecoder_gpu.json" in r for r in tiny_dec)
    assert len(when("START", "--preset tiny")) == 1
    assert "== e2e_sd15 FAILED" in log and "== e2e_sd15_refkernels ok" in log
    # what comes back: results, logs and the two training archives, without optimizer state
    names = sorted(p.name for p in out.iterdir())
    assert names == ["distill.tgz.part00", "logs.tgz", "results.tgz", "stage2.tgz.part00"], names
    for part, top in (("stage2.tgz.part00", "stage2"), ("distill.tgz.part00", "distill")):
        with tarfile.open(out / part) as tf:
            members = tf.getnames()
        assert f"{top}/{top}.log" in members and not any(m.endswith("checkpoint.safetensors") for m in members)
    with tarfile.open(out / "logs.tgz") as tf:
        assert {"logs/pytest_kernels.log", "logs/e2e_tiny.log", "logs/stage2.log"} <= set(tf.getnames())


def test_suite_rejects_unknown_options(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--bogus"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30, env=dict(os.environ, OUT=str(tmp_path)))
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stdout


def test_suite_engine_only_rerun_without_sweep(tmp_path):
    proc, log, calls, out = _run_suite(tmp_path, E2E_ONLY="engine", RASTER_SWEEP="0")
    starts = [ln for ln in calls.read_text().splitlines() if " START " in ln]
    e2e = [ln for ln in starts if "bench_e2e.py" in ln]
    assert e2e and all("--only engine" in ln for ln in e2e), log
    assert any("e2e_engine_gpu.json" in ln for ln in e2e) and any("e2e_sd15_engine_gpu.json" in ln for ln in e2e)
    assert not any("--raster-sweep" in ln for ln in starts if "bench_kernels.py" in ln)
    # the two test runs overlap (gpu tests in the background beside the kernel tests)
    assert any("-m gpu" in ln for ln in starts) and any("pytest tests/kernels" in ln for ln in starts)
    assert not any("train stage2" in ln for ln in starts)


def test_compile_row_only_when_asked(tmp_path):
    """E2E_COMPILE=1 adds the sd15 engine run on the compile backend; the default suite does not run it."""
    _, log, calls, _ = _run_suite(tmp_path, "--no-tests", E2E_COMPILE="1")
    starts = [ln for ln in calls.read_text().splitlines() if " START " in ln and "--backend compile" in ln]
    assert starts and all("--decoder tiny" in s and "--only engine" in s and "e2e_sd15_compile_gpu.json" in s
                          for s in starts), log
    plain = tmp_path / "plain"
    plain.mkdir()
    _, log, calls, _ = _run_suite(plain, "--no-tests")
    assert "bench_e2e.py" in calls.read_text() and "--backend compile" not in calls.read_text(), log


def test_step_and_kernel_switches(tmp_path):
    """E2E_STEPS picks the end-to-end runs (prefetch: the tiny-decoder run with --prefetch on), KERNEL_BENCH=0
    skips the kernel benchmarks, the default kernel benchmark sweeps the LBS launches, KERNEL_TESTS narrows the
    kernel tests."""
    _, log, calls, _ = _run_suite(tmp_path, "--no-tests", E2E_STEPS="prefetch", KERNEL_BENCH="0")
    starts = [ln for ln in calls.read_text().splitlines() if " START " in ln]
    e2e = [ln for ln in starts if "bench_e2e.py" in ln]
    assert e2e and all("--prefetch on" in ln and "e2e_sd15_prefetch_gpu.json" in ln for ln in e2e), log  # (+ retry)
    assert not any("bench_kernels.py" in ln for ln in starts)
    other = tmp_path / "other"
    other.mkdir()
    _, log, calls, _ = _run_suite(other, E2E_STEPS="tiny", KERNEL_TESTS="tests/kernels/test_lbs.py")
    starts = [ln for ln in calls.read_text().splitlines() if " START " in ln]
    assert any("bench_kernels.py" in ln and "--lbs-sweep" in ln for ln in starts), log
    kernel_tests = [ln for ln in starts if "-m pytest" in ln and "-m gpu" not in ln]
    assert kernel_tests and all("tests/kernels/test_lbs.py" in ln for ln in kernel_tests), log
