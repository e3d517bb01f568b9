"""Stage-1 training recipe: loss goes down, checkpoint + resume == uninterrupted, fp16 export round trip."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mvportrait.config import DenoiserConfig, Stage1TrainConfig
from mvportrait.models.text_encoder import HashingEncoder
from mvportrait.train.stage1 import (caption_texts, encode_captions, export_weights, load_weights, lr_at,
                                     train_model, train_stage1)
from mvportrait.data.corpus import Text2FlameCorpus


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine's other processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_data():
    corpus = Text2FlameCorpus.generate(48, seed=0, frames=32)
    caps = caption_texts(corpus, "motion", 2, seed=0)
    text = encode_captions(HashingEncoder(), caps)
    return corpus.motion_features(), text


def _tc(**kw):
    return Stage1TrainConfig(**{"steps": 24, "batch": 8, "lr": 3e-3, "warmup": 4, "checkpoint_every": 12,
                                "log_every": 4, "ema": 0.9, **kw})


def test_captions_and_encoding(tiny_data):
    corpus = Text2FlameCorpus.generate(4, seed=0, frames=32)
    caps = caption_texts(corpus, "emotion", 3, seed=0)
    assert len(caps) == 4 and all(len(c) == 3 for c in caps) and caps[0][0] == corpus.emotion_captions[0]
    assert caps == caption_texts(corpus, "emotion", 3, seed=0)
    x, text = tiny_data
    assert x.shape == (48, 32, 9) and text.shape == (48, 2, 384)


def test_lr_schedule():
    tc = Stage1TrainConfig(steps=100, warmup=10, lr=1.0)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(10, tc) == pytest.approx(1.0) and lr_at(99, tc) < 0.01


def test_loss_decreases_and_resume_matches(tmp_path, tiny_data):
    x, text = tiny_data
    cfg = DenoiserConfig.from_name("tiny", "motion")
    full = train_model("motion", cfg, _tc(), x, text, tmp_path / "full", seed=0)
    rows = [json.loads(line) for line in (tmp_path / "full" / "loss.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 24
    assert np.mean([r["loss"] for r in rows[-2:]]) < 0.8 * np.mean([r["loss"] for r in rows[:2]])

    train_model("motion", cfg, _tc(), x, text, tmp_path / "split", seed=0, stop_at=12)
    meta = json.loads((tmp_path / "split" / "checkpoint.json").read_text())
    assert meta["step"] == 12
    assert any(k.startswith("opt.") for k in load_file(str(tmp_path / "split" / "checkpoint.safetensors")))
    resumed = train_model("motion", cfg, _tc(), x, text, tmp_path / "split", seed=0, resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    with pytest.raises(ValueError, match="another config"):
        train_model("motion", cfg.replace(width=64), _tc(), x, text, tmp_path / "split", seed=0, resume=True)


def test_export_round_trip_fp16(tmp_path, tiny_data):
    x, text = tiny_data
    cfg = DenoiserConfig.from_name("tiny", "motion")
    model = train_model("motion", cfg, _tc(steps=5), x, text, tmp_path / "run", seed=0)
    w, j = export_weights(model, tmp_path / "out" / "motion", extra={"text_encoder": "hashing"})
    assert load_file(str(w))["input_proj.weight"].dtype == torch.float16
    loaded, meta = load_weights(tmp_path / "out" / "motion")
    assert meta["text_encoder"] == "hashing" and meta["config"] == cfg.to_dict()
    assert torch.equal(loaded.mean, model.mean) and torch.equal(loaded.std, model.std)  # kept in float32
    xt, t, c = torch.randn(2, 32, 9), torch.tensor([10, 700]), torch.randn(2, 384)
    with torch.no_grad():
        a, b = model(xt, t, c), loaded(xt, t, c)
    assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)


def test_train_stage1_end_to_end(tmp_path):
    summary = train_stage1("tiny", tmp_path, steps=4, batch=4, text_encoder="hashing",
                           train_overrides={"corpus_size": 16, "captions_per_clip": 1, "warmup": 1, "log_every": 2})
    for kind in ("motion", "emotion"):
        assert (tmp_path / "final" / f"{kind}.safetensors").is_file()
        assert summary["models"][kind]["params"] > 0
    from mvportrait.engine.text2flame import Text2FLAME

    pipe = Text2FLAME.from_pretrained(tmp_path / "final", overlap=8)
    assert pipe.text_encoder.name.lower().startswith("hash")
    assert pipe.generate("nods", seconds=1.0, steps=2).num_frames == 25
