import logging

import numpy as np
import pytest
import torch
from PIL import Image

from mvportrait.render.video import make_grid, read_video, save_frames, write_image, write_video


def _frames(t=6, h=48, w=64):
    """Smooth, codec-friendly frames: blocks of flat colour that change per frame."""
    f = np.zeros((t, h, w, 3), dtype=np.uint8)
    for i in range(t):
        f[i, : h // 2, : w // 2] = (200, 30 + 20 * i, 40)
        f[i, : h // 2, w // 2:] = (20, 180, 60 + 10 * i)
        f[i, h // 2:, :] = (90 + 15 * i, 90, 220)
    return f


def test_make_grid_layout():
    t, v, h, w = 2, 5, 4, 6
    frames = np.arange(v, dtype=np.uint8)[None, :, None, None, None] * 10 + np.zeros((t, v, h, w, 3), np.uint8) + 1
    g = make_grid(frames, pad=1, pad_value=255)
    assert g.shape == (t, 2 * h + 1, 3 * w + 2, 3)  # 5 views -> ceil(sqrt(5)) = 3 cols, 2 rows
    assert (g[:, :h, :w] == 1).all() and (g[:, :h, w + 1: 2 * w + 1] == 11).all()
    assert (g[:, h + 1:, w + 1: 2 * w + 1] == 41).all()  # view 4 at row 1, col 1
    assert (g[:, h, :] == 255).all() and (g[:, h + 1:, 2 * w + 2:] == 255).all()  # gap and empty slot
    assert make_grid(frames[:, :3], pad=0).shape == (t, h, 3 * w, 3)  # <= 4 views: one row
    tg = make_grid(torch.from_numpy(frames), cols=5, pad=0)
    assert isinstance(tg, torch.Tensor) and tg.shape == (t, h, 5 * w, 3)
    gray = make_grid(frames[..., :1], cols=1, pad=0)
    assert gray.shape == (t, v * h, w, 3)
    with pytest.raises(ValueError, match="uint8"):
        make_grid(frames.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(T, V, H, W, 3\)"):
        make_grid(frames[0])
    with pytest.raises(ValueError, match="cols"):
        make_grid(frames, cols=0)


def test_video_round_trip(tmp_path):
    frames = _frames()
    path = write_video(tmp_path / "clip.mp4", frames, fps=12)
    assert path.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
    back = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(np.int16) - frames).mean() < 6
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name in ("h264", "mpeg4") and s.codec_context.pix_fmt == "yuv420p"
        assert abs(float(s.average_rate) - 12) < 1e-6


def test_video_odd_size_and_torch_input(tmp_path):
    frames = torch.from_numpy(_frames(3, 33, 45))
    back = read_video(write_video(tmp_path / "odd.mp4", frames, fps=25))
    assert back.shape == (3, 34, 46, 3)
    assert np.abs(back[:, :33, :45].astype(np.int16) - frames.numpy()).mean() < 6


def test_mpeg4_fallback_warns(tmp_path, monkeypatch, caplog):
    import av

    real = av.codec.Codec

    def no_x264(name, mode="r"):
        if name == "libx264":
            raise ValueError(f"no encoder {name}")
        return real(name, mode)

    monkeypatch.setattr(av.codec, "Codec", no_x264)
    with caplog.at_level(logging.WARNING, logger="mvportrait.render.video"):
        path = write_video(tmp_path / "fallback.mp4", _frames(4), fps=10)
    assert "mpeg4" in caplog.text
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"
    assert read_video(path).shape == (4, 48, 64, 3)


def test_png_single_frame_and_contact_sheet(tmp_path):
    frames = _frames(1, 20, 30)
    save_frames(tmp_path / "one.png", frames)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), frames[0])
    many = _frames(10, 20, 30)
    save_frames(tmp_path / "sheet.png", many)
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape == (2 * 20 + 2, 4 * 30 + 6, 3)  # 8 frames, 4 per row, 2 px gaps
    assert np.array_equal(sheet[:20, :30], many[0]) and np.array_equal(sheet[22:, 96:], many[9])
    save_frames(tmp_path / "clip.mp4", many, fps=5)
    assert read_video(tmp_path / "clip.mp4").shape == many.shape
    write_image(tmp_path / "img.jpg", many[3])
    assert np.asarray(Image.open(tmp_path / "img.jpg")).shape == (20, 30, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "img.jpg", "one.png", "sheet.png"]


def test_bad_inputs_leave_nothing_behind(tmp_path):
    frames = _frames(2)
    with pytest.raises(ValueError, match="unknown suffix"):
        save_frames(tmp_path / "clip.gif", frames)
    with pytest.raises(ValueError, match="uint8"):
        save_frames(tmp_path / "clip.mp4", frames.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        write_video(tmp_path / "clip.mp4", frames[..., :2])
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "clip.mp4", frames, fps=0)
    with pytest.raises(ValueError, match="suffix"):
        write_image(tmp_path / "img.bmp", frames[0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_video(tmp_path / "missing" / "clip.mp4", frames)
    assert list(tmp_path.iterdir()) == []


def test_failed_encode_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"previous")
    frames = _frames(4)
    calls = {"n": 0}
    import av

    real = av.VideoFrame.from_ndarray

    def flaky(arr, format):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("encoder exploded")
        return real(arr, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", staticmethod(flaky))
    with pytest.raises(RuntimeError, match="exploded"):
        write_video(target, frames)
    assert target.read_bytes() == b"previous"  # old file untouched
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp file left


def test_read_video_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "nope.mp4")
