"""The synthetic multi-view corpus: format, determinism, split, cameras, references, disk cache."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mvportrait.data.images import load_reference_image
from mvportrait.data.multiview import (DEFAULT_REFERENCE_IDENTITY, DEPTH_RANGE, TEST_ID_BASE, CachedMultiView,
                                       MultiViewConfig, MultiViewCorpus, encode_depth, geometry_maps,
                                       identity_shape, reference_image, write_cache)
from mvportrait.flame.appearance import Appearance
from mvportrait.flame.params import FlameParams
from mvportrait.flame.synthetic import synthetic_head
from mvportrait.render.cameras import DEFAULT_TARGET, view_rig
from mvportrait.render.renderer import render

SMALL = dict(image_size=32, views=4, frames=4, frame_stride=2, clip_frames=60)
WEIGHTS = Path(__file__).resolve().parents[2] / "mvportrait" / "weights" / "reference"


@pytest.fixture(scope="module")
def corpus():
    return MultiViewCorpus("train", seed=3, **SMALL)


@pytest.fixture(scope="module")
def batch(corpus):
    return corpus.batch([0, 1, 2])


def test_batch_format(batch):
    b, v, f, h = 3, 4, 4, 32
    assert batch["reference"].shape == (b, 3, h, h)
    assert batch["renders"].shape == (b, v, f, 5, h, h)
    assert batch["target"].shape == (b, v, f, 3, h, h)
    assert batch["depth"].shape == (b, v, f, h, h)
    assert tuple(batch["cameras"].batch_shape) == (b, v) and batch["cameras"].height == h
    flame = batch["flame"]
    assert isinstance(flame, FlameParams) and flame.batch_size == b and flame.num_frames == f
    assert flame.fps == pytest.approx(25.0 / 2)
    assert batch["identity"].shape == (b,) and batch["index"].tolist() == [0, 1, 2]
    for key in ("reference", "renders", "target", "depth"):
        assert batch[key].dtype == torch.float32 and torch.isfinite(batch[key]).all()
    for key in ("reference", "target", "renders"):
        assert batch[key].min() >= -1 and batch[key].max() <= 1


def test_geometry_channels(batch):
    r = batch["renders"]
    normal, depth_enc, mask = r[:, :, :, :3], r[:, :, :, 3], r[:, :, :, 4]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    fg = mask > 0
    assert fg.float().mean() > 0.1  # the head fills a good part of the frame
    norm = normal.norm(dim=3)
    assert torch.allclose(norm[fg], torch.ones_like(norm[fg]), atol=1e-3)
    assert (normal.abs().sum(3)[~fg] == 0).all()
    assert (depth_enc[~fg] == -1).all()
    metres = batch["depth"]
    assert ((metres > 0) == fg).all()
    assert metres[fg].min() > DEPTH_RANGE[0] and metres[fg].max() < DEPTH_RANGE[1]
    assert torch.allclose(depth_enc, encode_depth(metres, mask))
    near, far = DEPTH_RANGE
    assert torch.allclose(depth_enc[fg], (far - metres[fg]) / (far - near) * 2 - 1)


def test_geometry_maps_from_a_render_output():
    head = synthetic_head(0)
    verts = head.model(FlameParams(shape=torch.zeros(2, 10), expression=torch.zeros(2, 3, 15)),
                       with_landmarks=False).vertices  # (B=2, T=3, Nv, 3)
    out = render(verts, head.model.faces, view_rig("ring-2", height=24, width=24), modes=("normal", "depth", "mask"))
    maps = geometry_maps(out)
    assert maps.shape == (2, 3, 2, 5, 24, 24)
    m = out.mask[..., 0]
    assert torch.equal(maps[:, :, :, 4], m)
    assert torch.allclose(maps[:, :, :, :3], (out.normal * 2 - 1).movedim(-1, -3) * m[:, :, :, None])
    assert torch.allclose(maps[:, :, :, 3], encode_depth(out.depth[..., 0], m))


def test_target_background_and_reference(corpus, batch):
    for k in range(3):
        ident = int(batch["identity"][k])
        bg = torch.tensor(Appearance.sample(ident).background, dtype=torch.float32) * 2 - 1
        tgt = batch["target"][k]  # (V, F, 3, H, W)
        empty = batch["renders"][k, :, :, 4] == 0
        assert torch.allclose(tgt.permute(0, 1, 3, 4, 2)[empty], bg.expand(int(empty.sum()), 3), atol=1e-5)
        # the reference is the identity at neutral expression and pose from the un-jittered front camera
        ref = reference_image(ident, 32)
        assert torch.allclose(batch["reference"][k], ref, atol=1e-4)


def test_reference_is_neutral_and_shared_by_an_identity():
    c = MultiViewCorpus("train", seed=0, n_identities=2, **SMALL)
    b = c.batch(range(6))
    ids = b["identity"].tolist()
    assert set(ids) == {0, 1}
    for i in range(6):
        j = ids.index(ids[i])
        assert torch.equal(b["reference"][i], b["reference"][j])
    # different samples of one identity move differently
    a, z = [i for i in range(6) if ids[i] == ids[0]][:2]
    assert not torch.allclose(b["target"][a], b["target"][z])


def test_deterministic_and_batch_independent(corpus, batch):
    again = MultiViewCorpus("train", seed=3, **SMALL)
    one = again.sample(1)
    for key in ("reference", "renders", "target", "depth"):
        assert torch.allclose(one[key], batch[key][1], atol=1e-4), key  # batched LBS rounds differently
    assert one["identity"] == int(batch["identity"][1]) and one["index"] == 1
    assert torch.equal(one["flame"].neck_pose, batch["flame"].neck_pose[1:2])
    other = MultiViewCorpus("train", seed=4, **SMALL).sample(1)
    assert not torch.allclose(other["target"], one["target"])


def test_motion_is_visible_over_the_window(batch):
    moving = (batch["target"][:, :, 1:] - batch["target"][:, :, :-1]).abs().mean(dim=(1, 3, 4, 5))  # (B, F-1)
    assert (moving.sum(1) > 0).all()
    pose = batch["flame"].neck_pose
    assert (pose[:, 1:] - pose[:, :-1]).abs().sum() > 0


def test_splits_have_disjoint_identities_and_streams():
    tr = MultiViewCorpus("train", seed=0, **SMALL)
    te = MultiViewCorpus("test", seed=0, **SMALL)
    assert set(tr.identities).isdisjoint(te.identities)
    tr_ids = {tr._spec(i)["identity"] for i in range(200)}
    te_ids = {te._spec(i)["identity"] for i in range(200)}
    assert tr_ids <= set(tr.identities) and te_ids <= set(te.identities)
    assert min(te_ids) >= TEST_ID_BASE and max(tr_ids) < TEST_ID_BASE
    assert len(tr_ids) > 100 and len(te_ids) > 50
    # no test identity has the shape of a training identity
    train_shapes = np.stack([identity_shape(i) for i in tr.identities])
    for i in list(te.identities)[:20]:
        assert np.abs(train_shapes - identity_shape(i)).max(1).min() > 0.5
    # motions come from different streams at the same index
    assert not np.allclose(tr._spec(0)["neck_pose"], te._spec(0)["neck_pose"])
    assert DEFAULT_REFERENCE_IDENTITY in te.identities


def test_camera_jitter(batch):
    cams = batch["cameras"]
    centres = cams.centers() - torch.tensor(DEFAULT_TARGET)  # (B, V, 3)
    dist = centres.norm(dim=-1)
    assert ((dist > 0.92 - 1e-4) & (dist < 1.08 + 1e-4)).all()
    yaw = torch.rad2deg(torch.atan2(centres[..., 0], centres[..., 2]))  # (B, V)
    want = torch.tensor([0.0, 90.0, 180.0, -90.0])
    err = (yaw - want + 180) % 360 - 180
    assert (err.abs() <= 5 + 1e-3).all() and (err.abs() > 0).any()
    pitch = torch.rad2deg(torch.asin(centres[..., 1] / dist))
    assert (pitch.abs() <= 5 + 1e-3).all()
    assert not torch.allclose(cams.R[0], cams.R[1])  # jitter differs per sample
    # the depth maps match the cameras: the head centre projects near the image centre
    uvz = cams.project(torch.tensor(DEFAULT_TARGET).expand(3, 4, 1, 3))
    assert ((uvz[..., :2] - 16).abs() < 6).all()


def test_bad_arguments(corpus):
    with pytest.raises(ValueError, match="split"):
        MultiViewCorpus("val")
    with pytest.raises(ValueError, match="views"):
        MultiViewCorpus(views=3, rig="ring-4")
    with pytest.raises(TypeError, match="unknown"):
        MultiViewCorpus(image_sz=64)
    with pytest.raises(ValueError, match="clip"):
        MultiViewConfig(frames=40, frame_stride=3, clip_frames=100)
    with pytest.raises(IndexError):
        corpus.sample(len(corpus))
    with pytest.raises(IndexError):
        corpus.batch([0, -1])
    with pytest.raises(ValueError):
        corpus.batch([])
    assert MultiViewCorpus(views=2, image_size=32).config.rig_spec == "ring-2"


def test_disk_cache_roundtrip(tmp_path, corpus):
    out = write_cache(tmp_path / "mv", 3, corpus, shard_size=2, batch_size=2)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.npz", "shard-00001.npz"]
    cached = CachedMultiView(out)
    assert len(cached) == 3 and cached.config == corpus.config
    live = corpus.batch([0, 1, 2])
    got = cached.batch([0, 1, 2])
    for key in ("reference", "target"):
        assert (got[key] - live[key]).abs().max() <= 1 / 127.5 + 1e-6
    assert torch.equal(got["renders"][:, :, :, 4], live["renders"][:, :, :, 4])
    assert (got["renders"][:, :, :, :3] - live["renders"][:, :, :, :3]).abs().max() <= 1 / 127.5 + 1e-6
    assert (got["depth"] - live["depth"]).abs().max() < 2e-3
    assert (got["renders"][:, :, :, 3] - live["renders"][:, :, :, 3]).abs().max() < 1e-2
    assert torch.allclose(got["cameras"].R, live["cameras"].R) and torch.allclose(got["cameras"].t, live["cameras"].t)
    assert torch.allclose(got["flame"].neck_pose, live["flame"].neck_pose) and got["flame"].fps == live["flame"].fps
    assert got["identity"].tolist() == live["identity"].tolist()
    s = cached.sample(2)
    assert s["target"].shape == (4, 4, 3, 32, 32) and s["index"] == 2
    with pytest.raises(IndexError):
        cached.sample(3)
    with pytest.raises(FileNotFoundError, match="manifest"):
        CachedMultiView(tmp_path)
    (out / "shard-00001.npz").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001"):
        CachedMultiView(out).sample(2)


def test_shipped_default_reference_matches_the_generator():
    path = WEIGHTS / "default.png"
    assert path.is_file(), "run python benchmarks/tools/make_reference.py"
    shipped = load_reference_image(path, 128)
    fresh = reference_image(DEFAULT_REFERENCE_IDENTITY, 128)
    assert (shipped - fresh).abs().max() <= 1.01 / 127.5
    assert (WEIGHTS / "README.md").is_file() and (WEIGHTS / "default_256.png").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    cpu = MultiViewCorpus("train", seed=1, **SMALL).batch([0, 1])
    gpu = MultiViewCorpus("train", seed=1, device="cuda", **SMALL).batch([0, 1])
    assert gpu["target"].is_cuda and gpu["renders"].is_cuda
    for key in ("reference", "target", "renders"):
        diff = (gpu[key].cpu() - cpu[key]).abs()
        assert (diff > 1e-3).float().mean() < 0.01, key  # a few edge pixels may flip
