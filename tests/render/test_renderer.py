import math

import pytest
import torch

from mvportrait.render import RenderOutput, render, to_uint8, trajectory, vertex_normals, view_rig


def _sphere(n_lat=24, n_lon=48, radius=0.1):
    """Closed UV sphere centred at the origin, faces CCW seen from outside."""
    th = torch.arange(1, n_lat, dtype=torch.float64) * math.pi / n_lat
    ph = torch.arange(n_lon, dtype=torch.float64) * 2 * math.pi / n_lon
    th, ph = torch.meshgrid(th, ph, indexing="ij")
    ring = torch.stack([th.sin() * ph.sin(), th.cos(), th.sin() * ph.cos()], -1).reshape(-1, 3)
    verts = torch.cat([ring, torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)])
    top, bot, last = len(ring), len(ring) + 1, (n_lat - 2) * n_lon
    faces = []
    for j in range(n_lon):
        jn = (j + 1) % n_lon
        faces += [[top, j, jn], [bot, last + jn, last + j]]
        for i in range(n_lat - 2):
            a, b, c, d = i * n_lon + j, i * n_lon + jn, (i + 1) * n_lon + jn, (i + 1) * n_lon + j
            faces += [[a, d, c], [a, c, b]]
    faces = torch.tensor(faces)
    n = torch.linalg.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    flip = (n * verts[faces].mean(1)).sum(-1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return (verts * radius).float(), faces


def test_vertex_normals_sphere_and_batch():
    v, f = _sphere()
    n = vertex_normals(v, f)
    # split quads make area weights slightly asymmetric: close to the radial direction, not exact
    torch.testing.assert_close(n, v / v.norm(dim=-1, keepdim=True), atol=3e-2, rtol=0)
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(len(v)))
    vb = torch.stack([v, v * 2 + 1])[None]  # (1, 2, Nv, 3)
    nb = vertex_normals(vb, f)
    assert nb.shape == vb.shape
    torch.testing.assert_close(nb[0, 1], n, atol=1e-5, rtol=0)


def test_vertex_normals_are_area_weighted():
    # vertex 0 shared by a big triangle facing +z and a small one facing +x
    v = torch.tensor([[0.0, 0, 0], [2, 0, 0], [0, 2, 0], [0, 0.1, 0], [0, 0, 0.1]])
    f = torch.tensor([[0, 1, 2], [0, 3, 4]])
    n0 = vertex_normals(v, f)[0]
    expect = torch.tensor([0.01, 0.0, 4.0])  # 2*area times unit normals: (0,0,4) + (0.01,0,0)
    torch.testing.assert_close(n0, expect / expect.norm())


def test_sphere_normal_map_depth_and_mask_area():
    r, h, w = 0.1, 129, 129
    v, f = _sphere(radius=r, n_lat=48, n_lon=96)
    cams = view_rig("yaws:0,90", height=h, width=w, target=(0, 0, 0), distance=1.0)
    out = render(v, f, cams)
    assert out.normal.shape == (1, 1, 2, h, w, 3) and out.mask.shape == (1, 1, 2, h, w, 1)
    for view in range(2):
        nrm = out.normal[0, 0, view]
        # centre pixel sees the sphere head-on: normal toward the viewer (display convention)
        torch.testing.assert_close(nrm[64, 64], torch.tensor([0.5, 0.5, 1.0]), atol=5e-3, rtol=0)
        assert nrm[64, 84, 0] > 0.6 and nrm[44, 64, 1] > 0.6  # right -> +x (red), up -> +y (green)
        assert (nrm[out.mask[0, 0, view, ..., 0] == 0] == 0).all()
        assert abs(out.depth[0, 0, view, 64, 64, 0] - (1.0 - r)) < 1e-3
    f_px = (h / 2) / math.tan(math.radians(18.0 / 2))
    rho = f_px * r / math.sqrt(1 - r * r)  # silhouette radius in pixels
    area = out.mask[0, 0, 0].sum().item()
    assert abs(area - math.pi * rho * rho) / (math.pi * rho * rho) < 0.02
    assert set(out.mask.unique().tolist()) <= {0.0, 1.0}


def test_shading_lambert_and_background():
    v, f = _sphere()
    cams = view_rig("yaws:0,180", height=65, width=65, target=(0, 0, 0))
    bg = (0.2, 0.4, 0.6)
    out = render(v, f, cams, light_dir=(0, 0, 1), ambient=0.0, diffuse=1.0, background=bg,
                 vertex_colors=torch.ones(v.shape[0], 3), modes=("shaded", "mask"))
    s, m = out.shaded[0, 0], out.mask[0, 0, ..., 0]
    assert out.normal is None and out.depth is None
    torch.testing.assert_close(s[0, 32, 32], torch.ones(3), atol=2e-3, rtol=0)  # camera-space head-light
    torch.testing.assert_close(s[1, 32, 32], torch.ones(3), atol=2e-3, rtol=0)
    torch.testing.assert_close(s[0][m[0] == 0], torch.tensor(bg).expand(int((m[0] == 0).sum()), 3))
    edge = (m[0] == 1) & (torch.nn.functional.max_pool2d(1 - m[0][None], 3, 1, 1)[0] > 0)
    assert s[0][edge].mean() < 0.5  # grazing at the silhouette
    # world-space light from +z: lit from the front camera, dark (ambient only) from behind
    col = torch.tensor([1.0, 0.5, 0.25]).expand(v.shape[0], 3)
    out = render(v, f, cams, light_dir=(0, 0, 1), light_space="world", ambient=0.1, diffuse=0.9,
                 vertex_colors=col, modes="shaded")
    torch.testing.assert_close(out.shaded[0, 0, 0, 32, 32], col[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(out.shaded[0, 0, 1, 32, 32], col[0] * 0.1, atol=2e-3, rtol=0)


def test_output_shapes_and_broadcasting():
    v, f = _sphere(8, 16)
    rig = view_rig("ring-3", height=24, width=20)
    motion = torch.stack([v + torch.tensor([0.01 * t, 0, 0]) for t in range(4)])  # (T=4, Nv, 3)
    verts = torch.stack([motion, motion * 1.1])  # (B=2, T=4, Nv, 3)
    out = render(verts, f, rig, modes=("mask", "depth"))
    assert out.mask.shape == (2, 4, 3, 24, 20, 1) and out.depth.shape == (2, 4, 3, 24, 20, 1)
    assert out.normal is None and out.shaded is None
    # each (b, t, view) equals rendering that mesh alone with that camera
    one = render(verts[1, 2], f, rig[1:2], modes=("depth",))
    assert one.depth.shape == (1, 1, 1, 24, 20, 1)
    torch.testing.assert_close(one.depth[0, 0, 0], out.depth[1, 2, 1])
    # (B, Nv, 3) is B meshes at one frame
    assert render(verts[:, 0], f, rig, modes="mask").mask.shape == (2, 1, 3, 24, 20, 1)
    # a static mesh along a (T, V) trajectory
    traj = trajectory(rig, "orbit", 5, degrees=40.0)
    tr = render(v, f, traj, modes=("normal",))
    assert tr.normal.shape == (1, 5, 3, 24, 20, 3)
    with pytest.raises(ValueError, match="frames"):
        render(verts, f, traj, modes="mask")
    assert isinstance(out, RenderOutput) and [k for k, _ in out.items()] == ["depth", "mask"]
    with pytest.raises(KeyError, match="not rendered"):
        out["normal"]


def test_render_bad_inputs():
    v, f = _sphere(6, 12)
    rig = view_rig("front", height=16, width=16)
    with pytest.raises(ValueError, match="modes"):
        render(v, f, rig, modes=("albedo",))
    bad = v.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        render(bad, f, rig)
    with pytest.raises(ValueError, match="vertices"):
        render(v, f + v.shape[0], rig)
    with pytest.raises(ValueError, match="shape"):
        render(v[:, :2], f, rig)
    with pytest.raises(ValueError, match="vertex_colors"):
        render(v, f, rig, vertex_colors=torch.ones(5, 3), modes="shaded")
    with pytest.raises(TypeError, match="Cameras"):
        render(v, f, "front")
    with pytest.raises(ValueError, match="light_dir"):
        render(v, f, rig, light_dir=(0, 0, 0), modes="shaded")


def test_to_uint8():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]
    assert to_uint8(x).dtype == torch.uint8
    with pytest.raises(TypeError):
        to_uint8(torch.zeros(3, dtype=torch.uint8))
