"""Reference image loading: modes, crop/resize, alpha, and every kind of bad input."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mvportrait.data.images import MAX_PIXELS, load_reference_image, save_image, to_pil
from mvportrait.data.multiview import REFERENCE_BACKGROUND


def _rgb(h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_header_only(w, h):
    """A PNG whose IHDR claims w x h followed by a tiny (wrong) IDAT: readable header, no real pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_rgb_png_roundtrip_exact(tmp_path):
    arr = _rgb(32, 32)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_reference_image(tmp_path / "a.png", 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)
    assert x.min() >= -1 and x.max() <= 1


def test_center_crop_then_lanczos_resize():
    arr = np.zeros((40, 100, 3), np.uint8)
    arr[:, :30] = 255  # left band: cut away by the centre crop (keeps columns 30..69)
    arr[:, 30:70] = (10, 200, 30)
    arr[:, 70:] = 255
    x = load_reference_image(Image.fromarray(arr), 20)
    want = torch.tensor([10, 200, 30]).float() / 127.5 - 1
    assert torch.allclose(x, want[:, None, None].expand(3, 20, 20), atol=1e-6)
    # tall image: rows cut symmetrically, same as cropping by hand then resizing with LANCZOS
    tall = _rgb(90, 50, seed=1)
    x = load_reference_image(Image.fromarray(tall), 25)
    ref = Image.fromarray(tall[20:70]).resize((25, 25), Image.Resampling.LANCZOS)
    assert torch.allclose(x, torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 127.5 - 1)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr", "PA"])
def test_modes_become_rgb(mode, tmp_path):
    base = Image.fromarray(_rgb(24, 24))
    if mode == "I;16":
        img = Image.fromarray(np.full((24, 24), 40000, np.uint16))
        assert img.mode == "I;16"
    elif mode == "I":
        img = Image.fromarray(np.full((24, 24), 65535, np.int32), mode="I")
    elif mode == "F":
        img = Image.fromarray(np.full((24, 24), 0.5, np.float32), mode="F")
    elif mode == "PA":
        img = base.convert("P").convert("PA")
    else:
        img = base.convert(mode)
    x = load_reference_image(img, 16)
    assert x.shape == (3, 16, 16) and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    if mode == "I;16":
        assert torch.allclose(x, torch.full_like(x, round(40000 / 257) / 127.5 - 1))
    if mode == "I":
        assert torch.allclose(x, torch.ones_like(x))
    if mode == "F":
        assert torch.allclose(x, torch.full_like(x, round(0.5 * 255) / 127.5 - 1), atol=1e-6)
    if mode in ("L", "I;16", "I", "F", "1"):
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # and from disk, where the format supports it
    fmt = {"CMYK": "jpeg", "YCbCr": "jpeg", "F": "tiff", "I": "tiff"}.get(mode, "png")
    if mode != "PA":
        path = tmp_path / f"img.{fmt}"
        img.save(path)
        assert load_reference_image(path, 16).shape == (3, 16, 16)


def test_alpha_composited_on_background():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 8:, 3] = 255  # right half opaque white, left half fully transparent
    x = load_reference_image(Image.fromarray(rgba, "RGBA"), 16)
    bg = round(REFERENCE_BACKGROUND[0] * 255) / 127.5 - 1
    assert torch.allclose(x[:, :, :8], torch.full((3, 16, 8), bg), atol=1e-6)
    assert torch.allclose(x[:, :, 8:], torch.ones(3, 16, 8))
    red = load_reference_image(Image.fromarray(rgba, "RGBA"), 16, background=(1, 0, 0))
    assert torch.allclose(red[:, :, 0], torch.tensor([1.0, -1.0, -1.0])[:, None].expand(3, 16))
    # palette image with a transparent index
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    p.info["transparency"] = 0
    y = load_reference_image(p, 8)
    assert torch.allclose(y, torch.full_like(y, bg), atol=1e-6)


def test_sources_bytes_stream_and_first_frame(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb(20, 20)).save(buf, "PNG")
    a = load_reference_image(buf.getvalue(), 20)
    b = load_reference_image(io.BytesIO(buf.getvalue()), 20)
    assert torch.equal(a, b)
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    g = load_reference_image(tmp_path / "anim.gif", 10)
    assert g[0].mean() > 0.9 and g[1].mean() < -0.9  # the first (red) frame


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # white left half
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    x = load_reference_image(tmp_path / "o.jpg", 10)  # crop keeps columns 5..14: white | black
    assert x[:, :, :3].mean() < -0.8 and x[:, :, 7:].mean() > 0.8  # flipped: black | white


def test_missing_empty_dir_and_non_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_reference_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png.*empty"):
        load_reference_image(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="not a regular file"):
        load_reference_image(tmp_path)
    (tmp_path / "notes.txt").write_text("hello, not an image\n" * 10)
    with pytest.raises(ValueError, match="notes.txt.*not an image"):
        load_reference_image(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="empty"):
        load_reference_image(b"")
    with pytest.raises(TypeError):
        load_reference_image(123)
    with pytest.raises(ValueError, match="size"):
        load_reference_image(Image.new("RGB", (4, 4)), 0)
    with pytest.raises(ValueError, match="background"):
        load_reference_image(Image.new("RGB", (4, 4)), 4, background=(2, 0, 0))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_and_corrupt(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cut.{fmt.lower()}.*(corrupt|truncated)"):
        load_reference_image(path)
    if fmt == "PNG":  # JPEG decoders accept garbage entropy data, so only PNG (CRC, zlib) is checked
        bad = bytearray(data)
        mid = len(bad) // 2
        bad[mid:mid + 64] = b"\x00" * 64
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="cut.png.*corrupt"):
            load_reference_image(path)


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(30000, 30000))  # 900 MP claimed, a few bytes of data
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or None, raising=True)
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="bomb.png.*(decompression bomb|limit)"):
        load_reference_image(path)
    assert not decoded and Image.MAX_IMAGE_PIXELS == before  # PIL's global guard is restored
    monkeypatch.undo()
    # a limit of our own, below PIL's
    small = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(small)
    with pytest.raises(ValueError, match="big.png.*limit of 50,000"):
        load_reference_image(small, max_pixels=50_000)
    assert load_reference_image(small, 8, max_pixels=60_000).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="limit of 50,000"):
        load_reference_image(Image.new("RGB", (300, 200)), max_pixels=50_000)
    assert MAX_PIXELS >= 4096 * 4096


def test_save_image_roundtrip(tmp_path):
    x = torch.rand(3, 12, 12) * 2 - 1
    path = save_image(x, tmp_path / "x.png")
    y = load_reference_image(path, 12)
    assert (x - y).abs().max() <= 1 / 127.5 + 1e-6
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="suffix"):
        save_image(x, tmp_path / "x.unknownext")
    with pytest.raises(ValueError):
        to_pil(torch.zeros(4, 3, 3))
