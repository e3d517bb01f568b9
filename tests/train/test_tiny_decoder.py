"""Tiny-decoder distillation on a micro teacher: loss falls, checkpoints/log/export, resume, eval, CLI errors."""
import json
import re

import pytest
import torch

from micro import micro_stage2_config
from mvportrait.cli import main
from mvportrait.models.stage2 import FLAME2VideoModel
from mvportrait.models.tiny_decoder import CONFIG_FILE, WEIGHTS_FILE, TinyDecoder
from mvportrait.train import tiny_decoder as T

SMALL = dict(batch=4, pool_size=2, views=2, frames=1, channels=(8, 8, 8), blocks=(1, 1, 1), crop=4, lr=1e-2,
             warmup=1, log_every=2, checkpoint_every=4)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A micro stage-2 model (random weights) saved as a teacher folder: (folder, model)."""
    torch.manual_seed(0)
    model = FLAME2VideoModel(micro_stage2_config()).eval()
    folder = tmp_path_factory.mktemp("teacher") / "stage2"
    model.save_pretrained(folder, dtype=torch.float32)
    return folder, model


@pytest.fixture(scope="module")
def run(teacher, tmp_path_factory):
    folder, _ = teacher
    out = tmp_path_factory.mktemp("tiny_run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = T.distill_decoder(out / "run", teacher_dir=folder, seed=0, overrides=dict(SMALL, steps=40))
    finally:
        torch.set_num_threads(n)
    return out / "run", res


def test_training_reduces_loss_and_writes_everything(run):
    out, res = run
    rows = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 41, 2))
    assert {"loss", "l1_gt", "l1_teacher", "lr"} <= set(rows[0])
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.95 * first  # a random micro encoder: the latents carry little, the colours are learnt
    assert res["steps"] == 40 and res["stopped_by"] == "steps" and res["pool_images"] == 4
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 40
    assert (out / "pool.safetensors").is_file() and (out / "summary.json").is_file()
    dec = TinyDecoder.from_pretrained(res["export"])
    assert (out / "tiny_decoder" / WEIGHTS_FILE).is_file()
    meta = json.loads((out / "tiny_decoder" / CONFIG_FILE).read_text())
    assert meta["dtype"] == "float16" and meta["info"]["run"]["steps"] == 40
    assert dec.config.channels == (8, 8, 8) and dec.factor == 4


def test_resume_continues_the_step_count_and_reuses_the_pool(run, teacher, tmp_path):
    import shutil

    folder, _ = teacher
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    res = T.distill_decoder(copy, teacher_dir=folder, seed=0, resume=True, overrides=dict(SMALL, steps=46))
    assert res["start"] == 40 and res["steps"] == 46
    assert res["data_s"] < 5  # the cached pool, no rendering
    rows = [json.loads(line) for line in (copy / "loss.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 46 and rows[19]["step"] == 40
    assert json.loads((copy / "checkpoint.json").read_text())["step"] == 46
    # without the data / architecture options: the run's own recipe (same pool, same decoder)
    res = T.distill_decoder(copy, teacher_dir=folder, seed=0, resume=True, overrides=dict(steps=48))
    assert res["start"] == 46 and res["steps"] == 48 and res["data_s"] < 5 and res["pool_images"] == 4
    assert TinyDecoder.from_pretrained(res["export"]).config.channels == (8, 8, 8)


def test_resume_matches_an_uninterrupted_run(teacher, tmp_path):
    _, model = teacher
    pool = T.DecoderPool.from_images(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), model.autoencoder)
    tc = T.TinyDecoderTrainConfig(**dict(SMALL, steps=6))
    cfg = T.TinyDecoderConfig(channels=(8, 8, 8), blocks=(1, 1, 1))
    torch.manual_seed(0)
    a = T.TinyDecoder(cfg)
    torch.manual_seed(0)
    b = T.TinyDecoder(cfg)
    T.train_tiny_decoder(a, pool, tc, tmp_path / "a")
    T.train_tiny_decoder(b, pool, tc, tmp_path / "b", stop_at=3)
    res = T.train_tiny_decoder(b, pool, tc, tmp_path / "b", resume=True)
    assert res["start"] == 3 and res["steps"] == 6
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=k)


def test_time_budget_stops_the_run(teacher, tmp_path):
    _, model = teacher
    pool = T.DecoderPool.from_images(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), model.autoencoder)
    dec = T.TinyDecoder(T.TinyDecoderConfig(channels=(8, 8, 8), blocks=(1, 1, 1)))
    res = T.train_tiny_decoder(dec, pool, T.TinyDecoderTrainConfig(**dict(SMALL, steps=100_000)), tmp_path,
                               time_budget_s=0.5)
    assert res["stopped_by"] == "time budget" and 1 <= res["steps"] < 100_000
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == res["steps"]


def test_export_only_from_checkpoint(run, tmp_path):
    out, _ = run
    T.export_checkpoint(out, tmp_path / "exp")
    a, b = TinyDecoder.from_pretrained(out / "tiny_decoder"), TinyDecoder.from_pretrained(tmp_path / "exp")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    with pytest.raises(FileNotFoundError, match="no tiny-decoder checkpoint"):
        T.export_checkpoint(tmp_path / "none", tmp_path / "x")


def test_evaluate_returns_the_fields(run, teacher):
    folder, _ = teacher
    out, _ = run
    rep = T.evaluate_weights(out / "tiny_decoder", teacher_dir=folder, n=2, seed=0)
    assert rep["images"] == 4 and rep["split"] == "test"
    for k in ("tiny_vs_gt", "full_vs_gt", "tiny_vs_full"):
        assert set(rep[k]) == {"psnr", "psnr_std", "ssim"} and rep[k]["psnr"] > 0
    for dt in ("float32", "bfloat16"):
        t = rep["timing"][dt]
        assert t["full"]["p50"] > 0 and t["tiny"]["p50"] > 0 and t["speedup_p50"] > 0
    assert rep["timing"]["batch"] == 2 and rep["tiny_params"] < rep["full_decoder_params"]


def test_cli_end_to_end(run, teacher, tmp_path, capsys):
    folder, _ = teacher
    out, _ = run
    n = torch.get_num_threads()
    try:
        assert main(["distill", "decoder", "--out", str(tmp_path / "r"), "--teacher", str(folder), "--steps", "3",
                     "--batch", "2", "--pool-size", "1", "--frames", "1", "--crop", "4", "--threads", "1",
                     "-q"]) == 0
        assert "tiny decoder: 3 steps" in capsys.readouterr().out
        # the CLI's decoder architecture is the default one; the micro run's export is evaluated
        assert main(["eval", "decoder", "--weights", str(out / "tiny_decoder"), "--teacher", str(folder), "--n", "1",
                     "--no-timing", "--out", str(tmp_path / "e.json")]) == 0
    finally:
        torch.set_num_threads(n)
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["n_frames"] == 1 and "tiny_vs_full" in rep and "timing" not in rep
    assert "tiny_vs_gt" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["distill", "decoder", "--out", "{tmp}/r", "--steps", "0"], "--steps must be >= 1"),
    (["distill", "decoder", "--out", "{tmp}/r", "--batch", "-2"], "--batch must be >= 1"),
    (["distill", "decoder", "--out", "{tmp}/r", "--crop", "-1"], "--crop must be >= 0"),
    (["distill", "decoder", "--out", "{tmp}/r", "--lr", "0"], "--lr must be > 0"),
    (["distill", "decoder", "--out", "{tmp}/r", "--seed", "-1"], "--seed must be >= 0"),
    (["distill", "decoder", "--out", "{tmp}/r", "--threads", "0"], "--threads must be >= 1"),
    (["distill", "decoder", "--out", "{tmp}/r", "--time-budget", "soon"], "--time-budget must be a number"),
    (["distill", "decoder", "--out", "{tmp}/r", "--time-budget", "-5"], "--time-budget must be > 0"),
    (["distill", "decoder", "--out", "{tmp}/r", "--teacher", "{tmp}"], "no stage-2 teacher"),
    (["distill", "decoder", "--out", "{tmp}/r", "--export-only"], "no tiny-decoder checkpoint"),
    (["eval", "decoder", "--n", "0"], "--n must be >= 1"),
    (["eval", "decoder", "--out", "{tmp}/e.txt"], "--out must be a .json file"),
    (["eval", "decoder", "--weights", "{tmp}/none"], "no tiny-decoder folder"),
])
def test_bad_options_exit_2_with_message(argv, match, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("argv", [
    ["distill", "decoder", "--out", "x", "--bogus"],
    ["distill", "decoder", "--out", "x", "--steps", "many"],
    ["distill", "decoder"],
    ["eval", "decoder", "--n", "1.5"],
])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
