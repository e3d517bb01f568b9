"""Reference images: load any picture PIL reads as a (3, H, W) tensor in [-1, 1]; save one back.

:func:`load_reference_image` does, in order:

1. **Open safely.** A path must exist (``FileNotFoundError``), be a regular file and not be empty;
   a file-like object or raw bytes are read as a stream. PIL reads only the header first: the
   pixel count ``width * height`` is checked against ``max_pixels`` (default
   :data:`MAX_PIXELS` = 40 megapixels) *before* any pixel is decoded, and PIL's own
   decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) is set to the same limit for the call,
   with its warning turned into an error. Non-images, corrupt and truncated files raise
   ``ValueError`` naming the source and the problem.
2. **Orientation and frames.** The EXIF orientation tag is applied (phone photos); of an animated
   or multi-page file the first frame is used.
3. **Colour.** Every mode becomes RGB: ``L`` / ``1`` / ``P`` / ``CMYK`` / ``YCbCr`` / ``LAB`` /
   ``HSV`` through PIL; 16/32-bit integer modes (``I;16*``, ``I``) are scaled from 0..65535 to
   0..255 (``I`` images with no value above 255 are taken as 8-bit); float ``F`` images are taken
   as 0..1 when their maximum is <= 1, else 0..255. Images with transparency (``RGBA``, ``LA``,
   ``PA``, ``P`` / ``L`` / ``RGB`` with a ``transparency`` entry) are alpha-composited over
   ``background``, by default :data:`~mvportrait.data.multiview.REFERENCE_BACKGROUND` (mid grey,
   the mean background colour of the synthetic corpus).
4. **Geometry.** The largest centred square is cropped (the longer side loses
   ``(long - short) // 2`` pixels at its start and the rest at its end), then resized to
   ``size x size`` with Lanczos filtering.
5. **Values.** ``x / 127.5 - 1`` as float32, layout (3, H, W).
"""
from __future__ import annotations

import io
import logging
import os
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mvportrait.data.multiview import REFERENCE_BACKGROUND
from mvportrait.fileio import atomic_write

__all__ = ["load_reference_image", "save_image", "to_pil", "MAX_PIXELS"]

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # width * height above this is refused before decoding
MAX_SIZE = 4096  # largest output side
_PIL_GUARD = threading.Lock()  # Image.MAX_IMAGE_PIXELS is process-wide: set it under a lock
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= MAX_SIZE:
        raise ValueError(f"size must be an int in [1, {MAX_SIZE}], got {size!r}")
    return int(size)


class _Refused(ValueError):
    """Our own refusal inside the PIL guard (passed through unchanged)."""


def _open(source, name: str, max_pixels: int) -> Image.Image:
    """Open and fully decode the first frame of ``source`` under the pixel limit (file closed after)."""
    with _PIL_GUARD, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with Image.open(source) as img:  # reads the header only
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise _Refused(f"{name}: image has an empty size {w}x{h}")
                if w * h > max_pixels:
                    raise _Refused(f"{name}: image is {w}x{h} = {w * h:,} pixels, above the limit of "
                                   f"{max_pixels:,} (possible decompression bomb); resize it first")
                img.seek(0)
                img.load()  # decodes; raises on truncated / corrupt data
                return img.copy()
        except _Refused:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"{name}: image is above the limit of {max_pixels:,} pixels (possible decompression "
                             f"bomb; PIL: {e}); resize it first") from None
        except UnidentifiedImageError:
            raise ValueError(f"{name}: not an image file PIL can read") from None
        except (OSError, SyntaxError, EOFError, ValueError, IndexError, TypeError, struct.error) as e:
            raise ValueError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _to_rgb(img: Image.Image, background, name: str) -> Image.Image:
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            scale = 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0
        elif mode.startswith("I;16") or np.max(a, initial=0) > 255:
            scale = 255.0 / 65535.0
        else:
            scale = 1.0
        a = np.nan_to_num(a * scale, nan=0.0).clip(0, 255).round().astype(np.uint8)
        img = Image.fromarray(a, mode="L")
        mode = "L"
    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    try:
        if not has_alpha:
            return img.convert("RGB")
        rgba = img.convert("RGBA")
    except (ValueError, OSError) as e:
        raise ValueError(f"{name}: cannot convert image mode {mode!r} to RGB ({e})") from None
    bg = tuple(int(round(float(c) * 255)) for c in background)
    base = Image.new("RGBA", rgba.size, bg + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _crop_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (s, s):
        img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return img


def load_reference_image(source, size: int = 128, *, background=REFERENCE_BACKGROUND,
                         max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """A reference portrait as a float32 tensor (3, size, size) in [-1, 1] (see the module docstring).

    ``source``: a path (str / PathLike), a ``PIL.Image.Image``, raw ``bytes``, or a binary file
    object. ``background``: RGB in [0, 1] under transparent pixels.
    """
    size = _check_size(size)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    bg = np.asarray(background, dtype=np.float64)
    if bg.shape != (3,) or not np.isfinite(bg).all() or (bg < 0).any() or (bg > 1).any():
        raise ValueError(f"background must be 3 numbers in [0, 1], got {background!r}")
    if isinstance(source, Image.Image):
        name = f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
        w, h = source.size
        if w * h > max_pixels:
            raise ValueError(f"{name}: {w * h:,} pixels is above the limit of {max_pixels:,}")
        if w <= 0 or h <= 0:
            raise ValueError(f"{name}: image has an empty size {w}x{h}")
        img = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise FileNotFoundError(f"reference image {name} does not exist")
        if not path.is_file():
            raise ValueError(f"reference image {name} is not a regular file")
        if path.stat().st_size == 0:
            raise ValueError(f"reference image {name} is an empty file")
        img = _open(path, name, max_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = f"<{len(source)} bytes>"
        if len(source) == 0:
            raise ValueError("reference image: the given bytes are empty")
        img = _open(io.BytesIO(bytes(source)), name, max_pixels)
    elif hasattr(source, "read"):
        name = f"<stream {getattr(source, 'name', type(source).__name__)}>"
        img = _open(source, name, max_pixels)
    else:
        raise TypeError(f"reference image source must be a path, bytes, a binary file or a PIL image, "
                        f"got {type(source).__name__}")
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError) as e:  # a broken EXIF block: keep the pixels as stored
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", name, e)
    img = _crop_resize(_to_rgb(img, bg, name), size)
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1


def to_pil(image: torch.Tensor, value_range=(-1.0, 1.0)) -> Image.Image:
    """A (3, H, W) or (1, H, W) float tensor with values in ``value_range`` -> RGB / L PIL image."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be a (3, H, W) or (1, H, W) tensor, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    x = ((image.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    arr = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")


def save_image(image: torch.Tensor, path, value_range=(-1.0, 1.0)) -> Path:
    """Write a (3, H, W) image tensor atomically; the format follows the suffix (``.png``, ``.jpg``, ...)."""
    pil = to_pil(image, value_range)
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {path} from its suffix; use .png or .jpg")

    def write(tmp):
        pil.save(tmp, format=fmt, **({"optimize": True} if fmt == "PNG" else {}))

    return atomic_write(path, write)
