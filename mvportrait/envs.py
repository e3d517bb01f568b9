"""Every environment variable mvportrait reads lives here; nowhere else reads ``os.environ``.

=================  =========================================================  ==========
variable           meaning                                                    default
=================  =========================================================  ==========
MVP_KERNELS        kernel dispatch: auto | triton | cpp | ref                 auto
MVP_BACKEND        network backend: torch | compile | onnxruntime | tensorrt, torch
                   or per stage: stage1=torch,stage2=onnxruntime
MVP_CACHE_DIR      where exported / built artifacts are cached                ~/.cache/mvportrait
MVP_LOG_LEVEL      log level of the ``mvportrait`` logger in the CLI           INFO
MVP_TEXT_MODEL     text encoder: minilm | hashing | local HF model folder     minilm
MVP_CUDA_GRAPHS    CUDA graphs for LBS / rasterizer calls: 1 | 0              1
=================  =========================================================  ==========
"""
from __future__ import annotations

import os
from pathlib import Path

KERNEL_CHOICES = ("auto", "triton", "cpp", "ref")
BACKEND_CHOICES = ("torch", "compile", "onnxruntime", "tensorrt")
BACKEND_STAGES = ("stage1", "stage2")


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def kernels() -> str:
    """Value of MVP_KERNELS (read at call time so tests can monkeypatch it)."""
    return _choice("MVP_KERNELS", "auto", KERNEL_CHOICES)


def cuda_graphs() -> bool:
    """Value of MVP_CUDA_GRAPHS: whether the kernels' public calls on CUDA replay CUDA graphs."""
    return _choice("MVP_CUDA_GRAPHS", "1", ("1", "0")) == "1"


def backend() -> str:
    """Value of MVP_BACKEND (checked with :func:`parse_backend_spec`)."""
    value = os.environ.get("MVP_BACKEND", "").strip().lower() or "torch"
    try:
        parse_backend_spec(value)
    except ValueError as e:
        raise ValueError(f"MVP_BACKEND: {e}") from None
    return value


def parse_backend_spec(text: str) -> dict[str, str]:
    """``"onnxruntime"`` -> every stage on it; ``"stage1=torch,stage2=onnxruntime"`` -> per stage
    (stages not named run ``torch``). Returns {stage: backend}."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a backend must be a non-empty string, got {text!r}")
    text = text.strip().lower()
    if "=" not in text:
        if text not in BACKEND_CHOICES:
            raise ValueError(f"backend {text!r} is not one of {', '.join(BACKEND_CHOICES)}")
        return {s: text for s in BACKEND_STAGES}
    out = {s: "torch" for s in BACKEND_STAGES}
    for part in text.split(","):
        stage, _, name = (x.strip() for x in part.partition("="))
        if stage not in BACKEND_STAGES or name not in BACKEND_CHOICES:
            raise ValueError(f"backend part {part.strip()!r} must be STAGE=BACKEND with STAGE one of "
                             f"{', '.join(BACKEND_STAGES)} and BACKEND one of {', '.join(BACKEND_CHOICES)}")
        out[stage] = name
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("MVP_CACHE_DIR", Path.home() / ".cache" / "mvportrait")).expanduser()


def log_level() -> str:
    return os.environ.get("MVP_LOG_LEVEL", "INFO").upper()


def text_model() -> str:
    """Value of MVP_TEXT_MODEL: the text encoder ``load_text_encoder()`` picks when given no name.

    A name (``minilm``, ``hashing``) or the path of a local sentence-transformers / Hugging Face
    model folder. Nothing is ever downloaded: a folder must already hold the files.
    """
    return os.environ.get("MVP_TEXT_MODEL", "").strip() or "minilm"
