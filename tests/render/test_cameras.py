import math

import pytest
import torch

from mvportrait.render.cameras import (
    DEFAULT_TARGET,
    Cameras,
    intrinsics_from_fov,
    look_at,
    parse_view_spec,
    trajectory,
    view_rig,
)


def _random_eyes(n, gen):
    d = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    d[:, 1] = d[:, 1].clamp(-1, 1)  # stay away from straight up/down
    return d / d.norm(dim=-1, keepdim=True) * (0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64))


def test_look_at_is_a_rotation_pointing_at_target():
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    eye = _random_eyes(16, gen)
    target = torch.randn(16, 3, generator=gen, dtype=torch.float64) * 0.1
    r, t = look_at(eye, target)
    assert r.shape == (16, 3, 3) and t.shape == (16, 3)
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(16, 3, 3))
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(16, dtype=torch.float64))
    x_cam = (r @ target[..., None])[..., 0] + t
    torch.testing.assert_close(x_cam[:, :2], torch.zeros(16, 2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(x_cam[:, 2], (target - eye).norm(dim=-1))
    assert (r[:, 1, 1] < 0).all()  # camera y (down) points against world up


def test_look_at_degenerate_raises():
    with pytest.raises(ValueError, match="parallel"):
        look_at((0.0, 2.0, 0.0), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="coincide"):
        look_at((0.0, 0.0, 1.0), (0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        look_at((0.0, 1.0), (0.0, 0.0, 0.0))


def test_optical_axis_projects_to_image_centre():
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    eye = _random_eyes(5, gen)
    target = torch.randn(5, 3, generator=gen, dtype=torch.float64) * 0.1
    r, t = look_at(eye, target)
    k = intrinsics_from_fov(30.0, 37, 64, dtype=torch.float64)
    cams = Cameras(k, r, t, 37, 64)
    uvz = cams.project(target[:, None])  # (5, 1, 3)
    torch.testing.assert_close(uvz[:, 0, :2], torch.tensor([32.0, 18.5], dtype=torch.float64).expand(5, 2))
    torch.testing.assert_close(uvz[:, 0, 2], (target - eye).norm(dim=-1))
    torch.testing.assert_close(cams.centers(), eye)


def test_front_camera_orientation():
    cams = view_rig("front", height=64, width=48, target=(0, 0, 0))
    torch.testing.assert_close(cams.centers()[0], torch.tensor([0.0, 0.0, 1.0]))
    pts = torch.tensor([[0.05, 0.0, 0.0], [0.0, 0.05, 0.0], [0.0, 0.0, 0.05]])  # subject's left, up, nose
    uvz = cams.project(pts)[0]
    assert uvz[0, 0] > 24 and abs(uvz[0, 1] - 32) < 1e-4  # subject's left appears on the image right
    assert uvz[1, 1] < 32 and abs(uvz[1, 0] - 24) < 1e-4  # up appears up (smaller v)
    assert uvz[2, 2] < 1.0  # the nose is nearer than the head centre


def test_side_cameras_see_the_profiles():
    cams = view_rig("yaws:90,-90,180", height=32, width=32, target=(0, 0, 0))
    nose = cams.project(torch.tensor([[0.0, 0.0, 0.1]]))[:, 0]
    # from the subject's left (+x) the face points to the image left; from the right, to the right
    assert nose[0, 0] < 16 and nose[1, 0] > 16
    torch.testing.assert_close(nose[2, :2], torch.tensor([16.0, 16.0]), atol=1e-4, rtol=0)
    assert nose[2, 2] > 1.0  # seen from behind, the nose is farther than the head centre
    left = cams.project(torch.tensor([[0.05, 0.0, 0.0]]))[2, 0]
    assert left[0] < 16  # from behind, the subject's left is on the image left


def test_intrinsics_fov_edge_and_validation():
    k = intrinsics_from_fov(40.0, 100, 80, dtype=torch.float64)
    # a point at half the vertical fov above the axis lands on the top image border (v = 0)
    y = -math.tan(math.radians(20.0))
    assert abs(k[1, 1] * y + k[1, 2]) < 1e-9
    assert k[0, 0] == k[1, 1] and k[0, 2] == 40 and k[1, 2] == 50
    for bad in (0.0, 180.0, float("nan"), -5.0):
        with pytest.raises(ValueError, match="fov"):
            intrinsics_from_fov(bad, 10, 10)
    with pytest.raises(ValueError, match="height"):
        intrinsics_from_fov(30.0, 0, 10)


def test_default_rig_frames_a_flame_head():
    cams = view_rig("front", height=256, width=256)
    # FLAME-scale extremes: top of the head, bottom of the neck, the ears
    pts = torch.tensor([[0.0, 0.12, 0.0], [0.0, -0.17, 0.0], [0.08, 0.0, 0.0], [-0.08, 0.0, 0.0]])
    uv = cams.project(pts)[0, :, :2]
    assert ((uv >= 0) & (uv <= 256)).all()
    assert (uv[1, 1] - uv[0, 1]) > 0.8 * 256  # the head fills most of the frame height


@pytest.mark.parametrize("spec, yaws", [
    ("front", [0.0]),
    ("ring-4", [0.0, 90.0, 180.0, 270.0]),
    ("RING-3", [0.0, 120.0, 240.0]),
    ("arc-3", [-60.0, 0.0, 60.0]),
    ("arc-1", [0.0]),
    ("yaws:0,45,-45", [0.0, 45.0, -45.0]),
    ([10, (20, 5.0)], [10.0, 20.0]),
])
def test_rig_specs(spec, yaws):
    views = parse_view_spec(spec)
    assert [y for y, _ in views] == pytest.approx(yaws)
    cams = view_rig(spec, height=32, width=40, target=(0, 0, 0), distance=2.0)
    assert cams.batch_shape == (len(yaws),) and cams.num_views == len(yaws)
    c = cams.centers().double()
    torch.testing.assert_close(c.norm(dim=-1), torch.full((len(yaws),), 2.0, dtype=torch.float64))
    for (yaw, pitch), ci in zip(views, c):
        expect = torch.tensor([math.cos(math.radians(pitch)) * math.sin(math.radians(yaw)),
                               math.sin(math.radians(pitch)),
                               math.cos(math.radians(pitch)) * math.cos(math.radians(yaw))], dtype=torch.float64) * 2
        torch.testing.assert_close(ci, expect, atol=1e-5, rtol=0)


def test_positive_yaw_moves_toward_subjects_left_and_pitch_up():
    cams = view_rig("yaws:30,0@20", height=16, width=16)
    c = cams.centers()
    assert c[0, 0] > 0.4  # +x = subject's left
    assert c[1, 1] > 0.3  # positive pitch = above
    # every camera sees the target at the image centre
    uv = cams.project(torch.tensor(DEFAULT_TARGET)[None])[:, 0, :2]
    torch.testing.assert_close(uv, torch.full((2, 2), 8.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec", ["back", "ring-0", "ring-x", "arc-", "yaws:", "yaws:a,b", "yaws:1@2@3",
                                  "yaws:0@90", [], [(1, 2, 3)], 5, None])
def test_bad_rig_specs(spec):
    with pytest.raises(ValueError, match="accepted forms"):
        view_rig(spec, height=8, width=8)


def test_rig_bad_args():
    with pytest.raises(ValueError, match="distance"):
        view_rig("front", height=8, width=8, distance=0)
    with pytest.raises(ValueError, match="height"):
        view_rig("front", height=-1, width=8)
    with pytest.raises(TypeError):
        view_rig("front")  # height / width are required


def test_project_broadcasting():
    cams = view_rig("ring-3", height=20, width=30)
    pts = torch.randn(7, 3) * 0.1
    assert cams.project(pts).shape == (3, 7, 3)
    b = cams.project(pts.expand(2, 4, 1, 7, 3))
    assert b.shape == (2, 4, 3, 7, 3)
    torch.testing.assert_close(b[1, 2], cams.project(pts))
    per_view = cams.project(pts.expand(3, 7, 3))
    torch.testing.assert_close(per_view, cams.project(pts))
    with pytest.raises(ValueError, match="broadcast"):
        cams.project(torch.randn(4, 7, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., N, 3\)"):
        cams.project(torch.randn(7, 2))
    with pytest.raises(ValueError, match="Cameras.to"):
        cams.project(pts.double())


def test_cameras_helpers():
    cams = view_rig("ring-4", height=20, width=30)
    assert len(cams) == 4 and cams[1].batch_shape == () and cams[1:3].batch_shape == (2,)
    torch.testing.assert_close(cams[2].centers(), cams.centers()[2])
    r = cams.reshape(2, 2)
    assert r.batch_shape == (2, 2) and r.num_views == 2
    d = cams.to(dtype=torch.float64)
    assert d.K.dtype == torch.float64 and d.height == 20
    shared_k = Cameras(cams.K[0], cams.R, cams.t, 20, 30)  # K (3, 3) broadcasts over the rig
    assert shared_k.K.shape == (4, 3, 3)
    with pytest.raises(IndexError):
        cams[0, 1]


@pytest.mark.parametrize("field, value, match", [
    ("height", 0, "height"),
    ("width", 2.5, "width"),
    ("K", torch.eye(4), r"\(\.\.\., 3, 3\)"),
    ("t", torch.zeros(2), r"\(\.\.\., 3\)"),
    ("R", torch.full((3, 3), float("nan")), "NaN"),
    ("R", torch.diag(torch.tensor([1.0, 1.0, -1.0])), "rotation"),
    ("R", torch.eye(3) * 2, "rotation"),
    ("K", torch.diag(torch.tensor([-10.0, 10.0, 1.0])), "focal"),
    ("K", torch.tensor([[10.0, 0, 5], [0, 10, 5], [1, 0, 1]]), "last row"),
    ("t", torch.zeros(5, 3), "broadcast"),
])
def test_cameras_validation(field, value, match):
    args = dict(K=intrinsics_from_fov(30.0, 10, 10).expand(2, 3, 3), R=torch.eye(3).expand(2, 3, 3),
                t=torch.zeros(2, 3), height=10, width=10)
    args[field] = value
    with pytest.raises(ValueError, match=match):
        Cameras(**args)


def test_trajectory_static():
    rig = view_rig("arc-3", height=16, width=16)
    tr = trajectory(rig, "static", 5)
    assert tr.batch_shape == (5, 3)
    torch.testing.assert_close(tr[4].R, rig.R)


def test_trajectory_orbit_is_continuous_and_keeps_target_centred():
    rig = view_rig("ring-2", height=32, width=32)
    tr = trajectory(rig, "orbit", 12, degrees=90.0, endpoint=True)
    assert tr.batch_shape == (12, 2) and tr.dtype == rig.dtype
    torch.testing.assert_close(tr[0].R, rig.R, atol=1e-6, rtol=0)
    c = tr.centers().double()  # (12, 2, 3)
    tgt = torch.tensor(DEFAULT_TARGET, dtype=torch.float64)
    torch.testing.assert_close((c - tgt).norm(dim=-1), torch.ones(12, 2, dtype=torch.float64), atol=1e-5, rtol=0)
    steps = (c[1:] - c[:-1]).norm(dim=-1)
    torch.testing.assert_close(steps, torch.full_like(steps, 2 * math.sin(math.radians(90 / 11 / 2))),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(c[-1, 0], tgt + torch.tensor([1.0, 0, 0], dtype=torch.float64), atol=1e-5, rtol=0)
    uv = tr.project(torch.tensor(DEFAULT_TARGET)[None].expand(12, 2, 1, 3))
    torch.testing.assert_close(uv[..., :2], torch.full((12, 2, 1, 2), 16.0), atol=1e-3, rtol=0)
    # a full orbit without endpoint loops: the step from the last frame back to the first is a normal step
    full = trajectory(rig, "orbit", 8).centers().double()
    torch.testing.assert_close((full[0] - full[-1]).norm(dim=-1), (full[1] - full[0]).norm(dim=-1), atol=1e-5, rtol=0)


def test_trajectory_dolly():
    rig = view_rig("arc-2", height=32, width=32, distance=1.0)
    tr = trajectory(rig, "dolly", 5, factor=0.5)
    dist = (tr.centers().double() - torch.tensor(DEFAULT_TARGET, dtype=torch.float64)).norm(dim=-1)
    torch.testing.assert_close(dist, torch.linspace(1.0, 0.5, 5, dtype=torch.float64)[:, None].expand(5, 2),
                               atol=1e-5, rtol=0)
    uv = tr.project(torch.tensor(DEFAULT_TARGET)[None])
    torch.testing.assert_close(uv[..., :2], torch.full((5, 2, 1, 2), 16.0), atol=1e-3, rtol=0)


def test_trajectory_bad_args():
    rig = view_rig("front", height=8, width=8)
    with pytest.raises(ValueError, match="static, orbit, dolly"):
        trajectory(rig, "spiral", 4)
    with pytest.raises(TypeError, match="unexpected"):
        trajectory(rig, "orbit", 4, factor=2.0)
    with pytest.raises(ValueError, match="frames"):
        trajectory(rig, "static", 0)
    with pytest.raises(ValueError, match=r"\(V,\)"):
        trajectory(trajectory(rig, "static", 2), "static", 2)
    with pytest.raises(ValueError, match="factor"):
        trajectory(rig, "dolly", 3, factor=-1.0)
