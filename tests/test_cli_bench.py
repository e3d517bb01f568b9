"""``mvportrait bench e2e`` end to end on a micro config (both pipelines, rows, profile), and bad options."""
import json

import pytest
import torch

from mvportrait.cli import main

MICRO = ["bench", "e2e", "--preset", "micro", "--views", "2", "--frames", "5", "--naive-steps", "2",
         "--naive-stage1-steps", "2", "--threads", "1", "--prompt", "nods, then smiles"]
KEYS = {"name", "backend", "metric", "unit", "p50", "p90", "n", "config", "device", "versions", "git_sha"}


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_e2e_micro_writes_rows_and_profile(tmp_path, capsys):
    out, prof = tmp_path / "e2e.json", tmp_path / "prof.txt"
    assert main(MICRO + ["--no-isolate", "--out", str(out), "--profile", str(prof)]) == 0
    rows = json.loads(out.read_text())
    assert all(set(r) == KEYS for r in rows)
    by = {(r["backend"].split()[0], r["metric"]): r for r in rows}
    for which in ("naive", "engine"):
        for metric in ("first_frame", "fps", "peak_memory", "stage:unet", "stage:decode", "stage:raster",
                       "stage:lbs", "stage:stage1", "stage:text"):
            r = by[(which, metric)]
            assert r["p50"] > 0 and r["p50"] == r["p90"], (which, metric)
        assert by[(which, "first_frame")]["config"]["frames"] == 5
    assert by[("naive", "stage:reference")]["p50"] > 0  # recomputed every step
    assert by[("naive", "first_frame")]["config"]["steps"] == 2
    eng = by[("engine", "fps")]["config"]
    assert eng["steps"] == 1 and eng["guidance"] == 1.0 and "consistency" in eng["engine_model"]
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert eng["dtype"] == ("bfloat16" if bf16 else "float32")  # --engine-dtype auto: the fast CPU setting
    assert by[("naive", "fps")]["config"]["dtype"] == "float32"
    assert by[("engine", "first_frame")]["config"]["first_frame_prepared_reference_s"] > 0
    synced = by[("engine", "first_frame")]["config"]["first_frame_synced_ms"]  # window 0 in one thread
    assert set(synced) == {"prepare_s", "admit_s", "model_launch_s", "model_wait_s", "model_again_s", "update_s",
                           "decode_s", "total_s"}
    assert synced["model_launch_s"] > 0 and synced["admit_s"] > 0 and synced["decode_s"] > 0
    assert synced["model_again_s"] > 0
    assert synced["total_s"] >= sum(v for k, v in synced.items() if k != "total_s") - 1.0  # rounding of 7 parts
    assert eng["target_fps"] == 24.0 and eng["vs_target"] == pytest.approx(by[("engine", "fps")]["p50"] / 24, rel=1e-3)
    speed = by[("engine/naive", "speedup_fps")]
    assert speed["p50"] == pytest.approx(by[("engine", "fps")]["p50"] / by[("naive", "fps")]["p50"])
    text = prof.read_text()
    assert "## engine" in text and "## naive" in text and "Self CPU" in text
    assert "window 0's first model call" in text and text.count("Self CPU") >= 3
    assert "engine/naive" in capsys.readouterr().out
    table = _harness().e2e_table([out])  # the README table
    assert table.count("\n| e2e |") == 3 and "**engine / naive**" in table and "2 views x 32 px" in table


def _harness():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "harness.py"
    spec = importlib.util.spec_from_file_location("bench_harness", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_e2e_isolated_engine_only(tmp_path):
    """Each pipeline in its own process (peak memory of that pipeline alone)."""
    out = tmp_path / "e2e.json"
    assert main(MICRO + ["--only", "engine", "--out", str(out), "--profile", "none"]) == 0
    rows = json.loads(out.read_text())
    assert {r["backend"] for r in rows} == {"engine (torch)"}
    assert all(r["config"]["isolated"] for r in rows)
    assert not (tmp_path / "e2e_micro_profile_cpu.txt").exists()
    assert all(r["config"]["decoder"] == "full" for r in rows)  # no tiny decoder beside a random-weight model


def test_bench_e2e_random_tiny_decoder(tmp_path):
    """--decoder tiny on a random-weight preset: the engine decodes with a random tiny decoder (its cost)."""
    out = tmp_path / "e2e.json"
    assert main(MICRO + ["--only", "engine", "--decoder", "tiny", "--out", str(out), "--profile", "none",
                         "--no-isolate"]) == 0
    assert {r["config"]["decoder"] for r in json.loads(out.read_text())} == {"tiny"}


def test_bench_e2e_channels_last_and_profile_named_after_out(tmp_path):
    """--channels-last on puts the engine's networks in channels_last (the rows say so); the profile is
    written beside --out under a name derived from it."""
    out = tmp_path / "e2e_micro_cl_cpu.json"
    assert main(MICRO + ["--only", "engine", "--channels-last", "on", "--first-window", "3", "--out", str(out),
                         "--no-isolate"]) == 0
    rows = json.loads(out.read_text())
    assert rows and all(r["config"]["channels_last"] is True and r["config"]["first_window"] == 3 for r in rows)
    assert (tmp_path / "e2e_micro_cl_profile_cpu.txt").is_file()


def test_bench_e2e_ddim_engine_takes_its_own_memory_format(tmp_path):
    """--sampler ddim: the engine is the teacher network with few DDIM steps, in its own FLAME2Video (so
    --channels-last reaches it; the naive pipeline's stays NCHW)."""
    out = tmp_path / "e2e.json"
    assert main(MICRO + ["--only", "engine", "--sampler", "ddim", "--steps", "1", "--channels-last", "on",
                         "--out", str(out), "--profile", "none", "--no-isolate"]) == 0
    rows = json.loads(out.read_text())
    assert rows and all(r["config"]["channels_last"] is True for r in rows)
    assert all("DDIM" in r["config"]["engine_model"] for r in rows)


@pytest.mark.parametrize("extra, message", [
    (["--preset", "huge"], "--preset"),
    (["--views", "0"], "--views"),
    (["--frames", "0"], "--frames"),
    (["--backend", "fast"], "--backend"),
    (["--engine-dtype", "float8"], "--engine-dtype"),
    (["--only", "both-ish"], "--only"),
    (["--sampler", "euler"], "--sampler"),
    (["--decoder", "small"], "--decoder"),
    (["--channels-last", "yes"], "--channels-last"),
    (["--first-window", "1"], "--first-window"),
    (["--size", "100"], "--size"),
    (["--preset", "tiny", "--size", "64"], "random-weight preset"),
    (["--device", "tpu"], "--device"),
    (["--weights", "/nonexistent"], "--weights"),
])
def test_bench_e2e_bad_options(extra, message, capsys):
    assert main(MICRO + extra) == 2
    assert message in capsys.readouterr().err
