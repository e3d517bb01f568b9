"""Stage-2 training recipe: stages, frozen parameters, resume, time budget, checkpoints."""
import json

import pytest
import torch

from mvportrait.models.stage2 import FLAME2VideoModel
from mvportrait.train.stage2 import (STAGE_DEFAULTS, STAGES, ClipPool, Stage2TrainConfig, lr_at, train_stage,
                                     trainable_parameters)


def test_all_stages_write_logs_and_a_loadable_model(stage2_micro_run):
    out, summary = stage2_micro_run
    assert list(summary["stages"]) == list(STAGES)
    for st in STAGES:
        rows = [json.loads(l) for l in (out / st / "loss.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    model = FLAME2VideoModel.from_pretrained(out / "final")
    ae = model.config.autoencoder
    assert ae.scaling_factor != 1.0  # calibrated to 1/std of the latents after the autoencoder stage
    assert summary["fps"] == pytest.approx(25.0 / STAGE_DEFAULTS["spatial"].frame_stride)


def test_stages_train_only_their_parameters(stage2_micro_run):
    out, _ = stage2_micro_run
    model = FLAME2VideoModel.from_pretrained(out / "final")
    names = {st: {n for n, _ in trainable_parameters(model, st)} for st in STAGES}
    for a in STAGES:  # the four groups are disjoint
        for b in STAGES:
            if a != b:
                assert not names[a] & names[b], (a, b)
    assert all(n.startswith("autoencoder.") for n in names["autoencoder"])
    assert any(n.startswith("reference_unet.") for n in names["spatial"])
    before = {n: p.clone() for n, p in model.named_parameters()}
    pool = ClipPool.build(model.config, 2, 1, "cpu")
    tc = Stage2TrainConfig(stage="temporal", steps=2, batch=1, views=1, frames=2, warmup=0, ema=0.0,
                           log_every=1, checkpoint_every=2)
    train_stage(model, pool, tc, out / "extra_temporal")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names["temporal"]


def test_resume_reproduces_the_uninterrupted_run(stage2_micro_run, tmp_path):
    out, _ = stage2_micro_run
    tc = Stage2TrainConfig(stage="view", steps=4, batch=1, views=2, frames=2, warmup=1, log_every=1,
                           checkpoint_every=2)
    model_a = FLAME2VideoModel.from_pretrained(out / "final")
    pool = ClipPool.build(model_a.config, 2, 3, "cpu")
    a, _ = train_stage(model_a, pool, tc, tmp_path / "a")
    model_b = FLAME2VideoModel.from_pretrained(out / "final")
    train_stage(model_b, pool, tc, tmp_path / "b", stop_at=2)
    model_b = FLAME2VideoModel.from_pretrained(out / "final")  # fresh process state, weights from the checkpoint
    b, _ = train_stage(model_b, pool, tc, tmp_path / "b", resume=True)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n


def test_time_budget_lowers_the_step_count(stage2_micro_run, tmp_path):
    out, _ = stage2_micro_run
    model = FLAME2VideoModel.from_pretrained(out / "final")
    pool = ClipPool.build(model.config, 2, 1, "cpu")
    tc = Stage2TrainConfig(stage="temporal", steps=10_000, batch=1, views=1, frames=2, log_every=10)
    _, ran = train_stage(model, pool, tc, tmp_path / "t", time_budget_s=0.5)
    assert 25 <= ran.steps < 10_000
    rows = [json.loads(l) for l in (tmp_path / "t" / "loss.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == ran.steps


def test_config_validation_and_lr():
    with pytest.raises(ValueError, match="stage"):
        Stage2TrainConfig(stage="vae")
    with pytest.raises(ValueError, match="batch"):
        Stage2TrainConfig(batch=0)
    with pytest.raises(ValueError, match="unknown"):
        Stage2TrainConfig().replace(bogus=1)
    tc = Stage2TrainConfig(steps=1000, warmup=100, lr=1.0)
    assert lr_at(0, tc) == pytest.approx(0.01) and lr_at(99, tc) == pytest.approx(1.0)
    assert lr_at(999, tc) < 1e-4
    short = Stage2TrainConfig(steps=20, warmup=100, lr=1.0)  # warm-up capped at a tenth of the run
    assert lr_at(1, short) == pytest.approx(1.0)


def test_later_stage_without_a_model_is_a_clear_error(tmp_path):
    from mvportrait.train.stage2 import train_stage2

    with pytest.raises(FileNotFoundError, match="earlier stages"):
        train_stage2("spatial", tmp_path)
