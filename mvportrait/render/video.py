"""Frame grids and atomic image / video writers (PIL for images, PyAV for MP4).

Frames are uint8 RGB: (T, H, W, 3) for a video, (H, W, 3) for an image; numpy arrays or torch
tensors. Every writer encodes into a temporary file in the destination directory and renames it
over the destination only when encoding succeeded, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from mvportrait.fileio import atomic_write
__all__ = ["make_grid", "write_video", "read_video", "write_image", "save_frames", "VIDEO_SUFFIXES",
           "IMAGE_SUFFIXES", "CONTACT_SHEET_FRAMES"]

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CONTACT_SHEET_FRAMES = 8  # at most this many frames, evenly spaced, on an image contact sheet


def _to_numpy_uint8(frames, name, ndim) -> np.ndarray:
    if hasattr(frames, "detach"):  # torch tensor, without importing torch here
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (use render.to_uint8 on [0, 1] floats), got {frames.dtype}")
    if ndim == 3 and frames.ndim == 2:  # (H, W) grey image
        frames = frames[..., None]
    if frames.ndim != ndim or frames.shape[-1] not in (1, 3) or 0 in frames.shape:
        want = "(T, H, W, 3)" if ndim == 4 else "(T, V, H, W, 3)" if ndim == 5 else "(H, W, 3)"
        raise ValueError(f"{name} must have shape {want} (3 or 1 channels, non-empty), got {frames.shape}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames)


def make_grid(frames, cols: int | None = None, pad: int = 2, pad_value: int = 0):
    """Tile views: (T, V, H, W, 3) uint8 -> (T, Hg, Wg, 3), views in row-major order.

    ``cols`` defaults to V for V <= 4 (one row) and ``ceil(sqrt(V))`` otherwise. ``pad`` pixels
    of ``pad_value`` go between tiles (not around the border). Returns the input's type
    (numpy array or torch tensor). One-channel input is expanded to RGB.
    """
    is_torch = hasattr(frames, "detach")
    arr = _to_numpy_uint8(frames, "frames", 5)
    t, v, h, w, c = arr.shape
    if cols is None:
        cols = v if v <= 4 else math.ceil(math.sqrt(v))
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
        raise ValueError(f"cols must be a positive int, got {cols!r}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    cols = min(cols, v)
    rows = math.ceil(v / cols)
    grid = np.full((t, rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, c), pad_value, dtype=np.uint8)
    for i in range(v):
        r, q = divmod(i, cols)
        grid[:, r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = arr[:, i]
    if is_torch:
        import torch

        return torch.from_numpy(grid).to(frames.device)
    return grid


def _pick_codec() -> str:
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # noqa: BLE001 - PyAV raises different types across versions
        logger.warning("PyAV has no libx264 encoder; writing MPEG-4 Part 2 (mpeg4) instead of H.264")
        return "mpeg4"


def write_video(path, frames, fps: float = 25.0, *, crf: int = 18) -> Path:
    """Write (T, H, W, 3) uint8 RGB frames to an MP4 (H.264 / yuv420p; mpeg4 if no libx264).

    yuv420p needs even sizes: odd heights / widths are padded by repeating the last row / column.
    """
    path = Path(path)
    arr = _to_numpy_uint8(frames, "frames", 4)
    if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    t, h, w, _ = arr.shape
    if h % 2 or w % 2:
        arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        logger.debug("padded %dx%d frames to %dx%d for yuv420p", h, w, arr.shape[1], arr.shape[2])
    import av
    from fractions import Fraction

    codec = _pick_codec()

    def write(tmp):
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = arr.shape[2], arr.shape[1]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf)}
            else:
                stream.bit_rate = 8_000_000
            for frame in arr:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    atomic_write(path, write)
    logger.info("wrote %s (%d frames, %dx%d, %s, %.3g fps)", path, t, arr.shape[2], arr.shape[1], codec, fps)
    return path


def read_video(path) -> np.ndarray:
    """Decode every frame of a video file: (T, H, W, 3) uint8 RGB."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {str(path)!r}")
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{str(path)!r} contains no video frames")
    return np.stack(frames)


def write_image(path, image) -> Path:
    """Write one (H, W, 3) (or (H, W) / (H, W, 1)) uint8 image; format from the suffix."""
    from PIL import Image

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"unsupported image suffix {path.suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
    arr = _to_numpy_uint8(image, "image", 3)
    fmt = "PNG" if suffix == ".png" else "JPEG"
    atomic_write(path, lambda tmp: Image.fromarray(arr, mode="RGB").save(tmp, format=fmt))
    logger.info("wrote %s (%dx%d)", path, arr.shape[1], arr.shape[0])
    return path


def save_frames(path, frames, fps: float = 25.0) -> Path:
    """Save (T, H, W, 3) uint8 frames by suffix.

    ``.mp4``: the whole video (see :func:`write_video`). ``.png`` / ``.jpg``: one image -- the
    frame itself when T = 1, otherwise a contact sheet of up to :data:`CONTACT_SHEET_FRAMES`
    evenly spaced frames (first and last included), 4 per row, 2 px black gaps.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise ValueError(f"cannot save frames to {str(path)!r}: unknown suffix {Path(path).suffix!r}; "
                         f"use one of {', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)}")
    arr = _to_numpy_uint8(frames, "frames", 4)
    if suffix in VIDEO_SUFFIXES:
        return write_video(path, arr, fps)
    t = arr.shape[0]
    if t == 1:
        return write_image(path, arr[0])
    k = min(t, CONTACT_SHEET_FRAMES)
    idx = np.unique(np.round(np.linspace(0, t - 1, k)).astype(np.int64))
    sheet = make_grid(arr[idx][None], cols=min(4, len(idx)), pad=2)[0]
    return write_image(path, sheet)
