"""rasterize_ref against an independent brute-force ray caster (float64), plus edge cases."""
import math
import random

import pytest
import torch

from mvportrait.kernels.rasterize import Fragments, interpolate, rasterize, rasterize_ref


@pytest.fixture
def gen():
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    return g  # gen.initial_seed() is shown in assertion messages


def _k(h, w, f=None):
    f = f or 0.9 * h
    return torch.tensor([[f, 0, w / 2], [0, 1.1 * f, h / 2], [0, 0, 1]], dtype=torch.float64)


def _project(p_cam, k):
    """Camera-space points (..., 3) -> [u, v, z] (..., 3)."""
    z = p_cam[..., 2]
    u = k[0, 0] * p_cam[..., 0] / z + k[0, 2]
    v = k[1, 1] * p_cam[..., 1] / z + k[1, 2]
    return torch.stack([u, v, z], -1)


def _brute(tris, k, h, w, cull=True, near=1e-4):
    """Möller-Trumbore ray casting through every pixel centre. tris (F, 3, 3) camera space.

    Returns tri_id (H, W), bary (H, W, 3), depth (H, W), ambiguous (H, W) -- pixels within a hair
    of an edge or of a depth tie between different triangles (excluded from exact comparison).
    """
    ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    d = torch.stack([(jj + 0.5 - k[0, 2]) / k[0, 0], (ii + 0.5 - k[1, 2]) / k[1, 1], torch.ones_like(ii)], -1)
    d = d.reshape(-1, 1, 3)  # (P, 1, 3), camera centre at the origin, d_z = 1 so ray t == depth
    v0, v1, v2 = tris[:, 0], tris[:, 1], tris[:, 2]  # (F, 3)
    e1, e2 = v1 - v0, v2 - v0
    pvec = torch.linalg.cross(d.expand(-1, len(tris), 3), e2.expand(d.shape[0], -1, 3))
    det = (e1 * pvec).sum(-1)  # (P, F)
    tvec = -v0
    qvec = torch.linalg.cross(tvec, e1)  # (F, 3)
    b1 = (tvec * pvec).sum(-1) / det
    b2 = (d * qvec).sum(-1) / det
    t = (e2 * qvec).sum(-1) / det
    b = torch.stack([1 - b1 - b2, b1, b2], -1)  # (P, F, 3)
    normal = torch.linalg.cross(e1, e2)
    valid = (tris[..., 2] > near).all(-1) & (normal.norm(dim=-1) > 0)
    if cull:
        valid &= (normal * v0).sum(-1) < 0  # outward normal points toward the camera
    hit = (b >= 0).all(-1) & valid & (det != 0)
    depth = torch.where(hit, t, torch.full_like(t, math.inf))
    best, idx = depth.min(-1)  # ties -> first index
    covered = torch.isfinite(best)
    tri_id = torch.where(covered, idx, -1)
    bary = b[torch.arange(len(b)), idx] * covered[:, None]
    near_edge = ((b.abs().amin(-1) < 1e-9) & valid & (b >= -1e-9).all(-1)).any(-1)
    srt = depth.sort(-1).values
    tie = torch.zeros_like(near_edge)
    if srt.shape[1] > 1:
        tie = torch.isfinite(srt[:, 1]) & ((srt[:, 1] - srt[:, 0]) < 1e-9 * srt[:, 0])
    return (tri_id.reshape(h, w), bary.reshape(h, w, 3), torch.where(covered, best, 0).reshape(h, w),
            (near_edge | tie).reshape(h, w))


def _soup(gen, n_tri, off_screen=0.0, behind=0):
    """Random camera-space triangles in front of the camera (some extending off-screen)."""
    c = torch.rand(n_tri, 1, 3, generator=gen, dtype=torch.float64)
    c = c * torch.tensor([1.2, 1.2, 2.0], dtype=torch.float64) + torch.tensor([-0.6, -0.6, 1.0], dtype=torch.float64)
    c[..., :2] *= c[..., 2:] * (1 + off_screen)
    tris = c + (torch.rand(n_tri, 3, 3, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    tris[:behind, 0, 2] = -0.3 * torch.rand(behind, generator=gen, dtype=torch.float64)  # vertex behind near plane
    return tris


def _compare(frags, ref, seed, tol=1e-9):
    tri_id, bary, depth, amb = ref
    ok = ~amb
    assert ok.float().mean() > 0.95, f"too many ambiguous pixels (seed {seed})"
    assert torch.equal(frags.tri_id[ok], tri_id[ok]), f"coverage/visibility mismatch (seed {seed})"
    assert torch.equal(frags.mask, frags.tri_id >= 0)
    torch.testing.assert_close(frags.bary[ok], bary[ok].to(frags.bary.dtype), atol=tol, rtol=0,
                               msg=f"bary mismatch (seed {seed})")
    torch.testing.assert_close(frags.depth[ok], depth[ok].to(frags.depth.dtype), atol=tol, rtol=tol,
                               msg=f"depth mismatch (seed {seed})")
    empty = frags.tri_id < 0
    assert (frags.depth[empty] == 0).all() and (frags.bary[empty] == 0).all()


def _separate(tris):
    """(F, 3, 3) triangles -> verts (3F, 3), faces (F, 3) with no shared vertices."""
    return tris.reshape(-1, 3), torch.arange(3 * len(tris)).reshape(-1, 3)


@pytest.mark.parametrize("hw", [(32, 32), (37, 53), (1, 7), (50, 19)])
def test_single_triangle_matches_brute_force(gen, hw):
    h, w = hw
    k = _k(h, w)
    for _ in range(5):
        tris = _soup(gen, 1) * torch.tensor([0.3, 0.3, 1.0], dtype=torch.float64)
        verts, faces = _separate(tris)
        pix = _project(verts, k)[None]
        for cull in (True, False):
            frags = rasterize(pix, faces, h, w, cull_backfaces=cull)
            _compare(_first(frags), _brute(tris, k, h, w, cull), gen.initial_seed())


def _first(frags, i=0):
    return Fragments(frags.tri_id[i], frags.bary[i], frags.depth[i], frags.mask[i])


@pytest.mark.parametrize("hw", [(40, 40), (33, 61)])
@pytest.mark.parametrize("cull", [True, False])
def test_triangle_soup_matches_brute_force(gen, hw, cull):
    """Overlapping, intersecting, off-screen triangles and triangles crossing the near plane."""
    h, w = hw
    k = _k(h, w)
    tris = _soup(gen, 24, off_screen=0.5, behind=4)
    verts, faces = _separate(tris)
    frags = rasterize(_project(verts, k)[None], faces, h, w, cull_backfaces=cull)
    ref = _brute(tris, k, h, w, cull)
    _compare(_first(frags), ref, gen.initial_seed())
    assert not torch.isin(frags.tri_id, torch.arange(4)).any(), "triangles behind the near plane must be dropped"
    assert frags.mask.any()


def test_float32_inputs_agree_with_brute_force(gen):
    h, w = 45, 38
    k = _k(h, w)
    tris = _soup(gen, 16).float().double()  # geometry exactly representable in float32
    verts, faces = _separate(tris)
    pix = _project(verts, k)
    ref = _brute(tris, k, h, w)
    frags = rasterize(pix.float()[None], faces, h, w)
    assert frags.bary.dtype == torch.float32 and frags.depth.dtype == torch.float32
    # float32 [u, v] differs from the exact projection by rounding: compare away from edges only.
    tri_id, bary, depth, amb = ref
    ok = ~amb & (frags.tri_id[0] == tri_id)
    assert ok.float().mean() > 0.97, f"seed {gen.initial_seed()}"
    torch.testing.assert_close(frags.depth[0][ok], depth[ok].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frags.bary[0][ok], bary[ok].float(), rtol=0, atol=2e-4)


def test_batch_matches_individual_calls(gen):
    h, w = 29, 31
    k = _k(h, w)
    scenes = [_soup(gen, 10) for _ in range(3)]
    verts = torch.stack([_separate(t)[0] for t in scenes])  # (3, 30, 3)
    faces = _separate(scenes[0])[1]
    pix = _project(verts, k)
    batched = rasterize(pix, faces, h, w)
    for i in range(3):
        single = rasterize(pix[i:i + 1], faces, h, w)
        for name in ("tri_id", "bary", "depth", "mask"):
            assert torch.equal(getattr(batched, name)[i], getattr(single, name)[0]), name
        _compare(_first(batched, i), _brute(scenes[i], k, h, w), gen.initial_seed())


@pytest.mark.parametrize("cull", [True, False])
def test_chunking_does_not_change_results(gen, cull):
    """Later chunks bring nearer surfaces with higher ids: the z-buffer merge must handle it."""
    h, w = 48, 64
    k = _k(h, w)
    tris = _soup(gen, 40, off_screen=0.3)
    verts, faces = _separate(tris)
    pix = _project(verts, k)[None]
    big = rasterize_ref(pix, faces, h, w, cull_backfaces=cull)
    # every triangle through the gathered path / the per-triangle row-block path, many chunk sizes
    for chunk, large in ((1, 10**9), (97, 10**9), (1000, 10**9), (1, 1), (50, 1), (10**6, 1), (64, 200)):
        small = rasterize_ref(pix, faces, h, w, cull_backfaces=cull, max_candidates=chunk, large_bbox=large)
        for name in ("tri_id", "bary", "depth", "mask"):
            assert torch.equal(getattr(big, name), getattr(small, name)), (chunk, large, name, gen.initial_seed())
    _compare(_first(small), _brute(tris, k, h, w, cull), gen.initial_seed())


def test_canonical_edge_order_keeps_float64_meshes_watertight(gen):
    """Shared edges passing within rounding distance of pixel centres, full float64 mantissas.

    Two triangles share the edge (a, b); a, b are random points on a line through a pixel centre
    (rounded to float64, so the centre is off the edge by ~1e-16). Exactly one of the two
    triangles must cover that pixel, in every one of many random trials.
    """
    n = 400
    h = w = 9
    p = torch.tensor([4.5, 4.5], dtype=torch.float64)
    ang = torch.rand(n, generator=gen, dtype=torch.float64) * math.pi
    d = torch.stack([ang.cos(), ang.sin()], -1)  # (n, 2)
    t1 = -(1 + 3 * torch.rand(n, 1, generator=gen, dtype=torch.float64))
    t2 = 1 + 3 * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    a, b = p + t1 * d, p + t2 * d
    side = torch.stack([-d[:, 1], d[:, 0]], -1)
    c1 = p + side * 3 + d * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    c2 = p - side * 3 + d * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    uv = torch.stack([a, b, c1, c2], 1)  # (n, 4, 2)
    pix = torch.cat([uv, torch.ones(n, 4, 1, dtype=torch.float64)], -1)
    faces = torch.tensor([[0, 1, 2], [1, 0, 3]])  # consistent orientation across the shared edge
    m0 = rasterize(pix, faces[:1], h, w, cull_backfaces=False).mask[:, 4, 4]
    m1 = rasterize(pix, faces[1:], h, w, cull_backfaces=False).mask[:, 4, 4]
    assert (m0.long() + m1.long() == 1).all(), f"{int((m0 == m1).sum())} cracks/overlaps (seed {gen.initial_seed()})"


def test_big_triangle_covers_whole_image_across_chunks():
    h, w = 47, 65
    k = _k(h, w)
    # one triangle much larger than the view, tilted, front-facing (clockwise on screen = 2A < 0)
    tri = torch.tensor([[[-50.0, -40.0, 3.0], [-40.0, 60.0, 5.0], [60.0, -30.0, 4.0]]], dtype=torch.float64)
    verts, faces = _separate(tri)
    pix = _project(verts, k)[None]
    frags = rasterize_ref(pix, faces, h, w, max_candidates=500)  # row blocks of 7 rows
    assert frags.mask.all()
    _compare(_first(frags), _brute(tri, k, h, w), "fixed")
    gathered = rasterize_ref(pix, faces, h, w, max_candidates=500, large_bbox=10**9)  # ~7 chunks of one bbox
    assert torch.equal(gathered.bary, frags.bary) and torch.equal(gathered.tri_id, frags.tri_id)


def _cube(half=0.25):
    """Closed cube centred at the origin, 8 vertices, 12 faces CCW seen from outside."""
    v = torch.tensor([[x, y, z] for x in (-half, half) for y in (-half, half) for z in (-half, half)],
                     dtype=torch.float64)
    quads = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    faces = []
    for a, b, c, d in quads:
        faces += [[a, b, c], [a, c, d]]
    faces = torch.tensor(faces)
    n = torch.linalg.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    flip = (n * v[faces].mean(1)).sum(-1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return v, faces


def test_cube_front_depth_and_area():
    h, w = 101, 120
    k = _k(h, w, f=100.0)
    v, faces = _cube()
    # camera 2 m in front of the cube face looking at it: world z -> camera depth 2 - z, x -> x, y -> -y
    cam = torch.stack([v[:, 0], -v[:, 1], 2.0 - v[:, 2]], -1)  # proper rotation (180 deg about x) + shift
    frags = rasterize(_project(cam, k)[None].float(), faces, h, w)
    d = frags.depth[0][frags.mask[0]]
    assert d.numel() > 0
    torch.testing.assert_close(d, torch.full_like(d, 1.75), atol=1e-5, rtol=0)
    # covered pixel count = pixel centres strictly inside the projected front square
    s = 0.25 / 1.75
    cu = ((torch.arange(w) + 0.5 - w / 2).abs() < k[0, 0] * s).sum()
    cv = ((torch.arange(h) + 0.5 - h / 2).abs() < k[1, 1] * s).sum()
    assert frags.mask.sum() == cu * cv
    # only the two front faces (world z = +0.25) are visible
    front = (v[faces][:, :, 2] > 0.2).all(-1).nonzero()[:, 0]
    assert len(front) == 2
    assert set(frags.tri_id[frags.mask].unique().tolist()) == set(front.tolist())


def test_depth_order_and_exact_ties():
    h, w = 20, 20
    k = _k(h, w)
    base = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
    # (x, y) -> clockwise on screen => front-facing; face 0 far, face 1 near => face 1 wins
    tris = torch.stack([base + torch.tensor([0, 0, 3.0], dtype=torch.float64),
                        base * 0.5 + torch.tensor([0, 0, 2.0], dtype=torch.float64)])
    verts, faces = _separate(tris)
    frags = rasterize(_project(verts, k)[None], faces, h, w)
    ids = frags.tri_id[0]
    assert (ids == 1).any() and (ids == 0).any()
    assert torch.allclose(frags.depth[0][ids == 1], torch.tensor(2.0, dtype=torch.float64))
    # swapping the order of faces keeps the nearer one visible
    frags2 = rasterize(_project(verts, k)[None], faces.flip(0), h, w)
    assert torch.equal(frags2.tri_id[0] == 0, ids == 1)
    # exact ties: the same triangle twice (shared and duplicated vertices) -> lowest face id
    verts3 = torch.cat([verts[:3], verts[:3]])
    for f3 in (torch.tensor([[3, 4, 5], [0, 1, 2], [0, 1, 2]]), torch.tensor([[0, 1, 2], [3, 4, 5]])):
        fr = rasterize(_project(verts3, k)[None], f3, h, w)
        assert fr.mask.any()
        assert (fr.tri_id[fr.mask] == 0).all()
    # exact ties between faces with different vertex order (dyadic geometry at z = 1, so every
    # permutation computes depth exactly 1): the lowest face id wins and its barycentrics are output
    pix = torch.tensor([[[0.5, 0.5, 1.0], [16.5, 0.5, 1.0], [0.5, 16.5, 1.0]]])
    rot = torch.tensor([[1, 2, 0], [0, 1, 2], [2, 0, 1]])
    for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        fr = rasterize(pix, rot[order], h, w, cull_backfaces=False)
        alone = rasterize(pix, rot[order[:1]], h, w, cull_backfaces=False)
        assert fr.mask.sum() > 100 and (fr.tri_id[fr.mask] == 0).all() and (fr.depth[fr.mask] == 1).all()
        assert torch.equal(fr.bary, alone.bary)


def test_backface_culling_convention():
    """A world triangle CCW seen from +z faces a camera on +z; reversed winding is culled."""
    h, w = 24, 24
    k = _k(h, w)
    world = torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    n = torch.linalg.cross(world[1] - world[0], world[2] - world[0])
    assert n[2] > 0  # outward normal +z
    # front camera at (0, 0, 2) looking toward -z: OpenCV rotation diag(1, -1, -1)
    cam = world * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64) + torch.tensor([0, 0, 2.0], dtype=torch.float64)
    pix = _project(cam, k)[None]
    u, v = pix[0, :, 0], pix[0, :, 1]
    area2 = (u[1] - u[0]) * (v[2] - v[0]) - (v[1] - v[0]) * (u[2] - u[0])
    assert area2 < 0  # front faces have negative signed area in y-down pixel coords
    ccw, cw = torch.tensor([[0, 1, 2]]), torch.tensor([[0, 2, 1]])
    assert rasterize(pix, ccw, h, w).mask.any()
    assert not rasterize(pix, cw, h, w).mask.any()
    assert torch.equal(rasterize(pix, cw, h, w, cull_backfaces=False).mask, rasterize(pix, ccw, h, w).mask)


def test_degenerate_triangles_cover_nothing():
    pix = torch.tensor([[[1.5, 1.5, 1.0], [5.5, 5.5, 1.0], [9.5, 9.5, 1.0], [3.5, 3.5, 1.0]]])
    faces = torch.tensor([[0, 1, 2], [0, 0, 3], [1, 2, 0]])
    frags = rasterize(pix, faces, 12, 12, cull_backfaces=False)
    assert not frags.mask.any() and (frags.tri_id == -1).all()


def test_top_left_rule_is_watertight(gen):
    """Edges through pixel centres: every pixel of a tiled square is covered exactly once."""
    h, w = 14, 17
    g = 4  # 4x4 vertex grid, 3 px spacing, vertices exactly on pixel centres
    xs = torch.arange(g, dtype=torch.float64) * 3 + 1.5
    uu, vv = torch.meshgrid(xs, xs, indexing="xy")
    pix = torch.stack([uu.reshape(-1), vv.reshape(-1), torch.ones(g * g, dtype=torch.float64)], -1)[None]
    faces = []
    for r in range(g - 1):
        for c in range(g - 1):
            a, b, cc, d = r * g + c, r * g + c + 1, (r + 1) * g + c + 1, (r + 1) * g + c
            faces += [[a, b, cc], [a, cc, d]] if torch.rand(1, generator=gen) < 0.5 else [[a, b, d], [b, cc, d]]
    faces = torch.tensor(faces)
    count = sum(rasterize(pix, faces[i:i + 1], h, w, cull_backfaces=False).mask[0].long() for i in range(len(faces)))
    inside = torch.zeros(h, w, dtype=torch.long)
    inside[1:10, 1:10] = 1  # centres 1.5 .. 9.5: top/left edges owned, bottom/right (10.5) not
    assert torch.equal(count, inside), f"seed {gen.initial_seed()}"
    # random jittered grid in float32 with shared vertices: still no cracks or overlaps
    jit = pix.clone().float()
    jit[0, :, :2] += (torch.rand(g * g, 2, generator=gen) - 0.5) * 1.2
    border = (uu.reshape(-1) == xs[0]) | (uu.reshape(-1) == xs[-1]) | (vv.reshape(-1) == xs[0]) | (vv.reshape(-1) == xs[-1])
    jit[0, border, :2] = pix[0, border, :2].float()
    count = sum(rasterize(jit, faces[i:i + 1], h, w, cull_backfaces=False).mask[0].long() for i in range(len(faces)))
    assert torch.equal(count, inside), f"seed {gen.initial_seed()}"


def test_perspective_correct_barycentrics_on_tilted_plane(gen):
    h, w = 41, 57
    k = _k(h, w)
    # tilted quad in camera space: plane through (0, 0, 2) with normal (0.3, -0.4, -1)
    n = torch.tensor([0.3, -0.4, -1.0], dtype=torch.float64)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    z = 2.0 - (n[0] * corners[:, 0] + n[1] * corners[:, 1]) / n[2]
    verts = torch.cat([corners, z[:, None]], -1)  # (4, 3) camera space
    assert ((verts - torch.tensor([0, 0, 2.0], dtype=torch.float64)) @ n).abs().max() < 1e-12
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    pix = _project(verts, k)[None]
    frags = rasterize(pix, faces, h, w, cull_backfaces=False)
    pos = interpolate(verts[None], faces, frags)[0]  # (H, W, 3) interpolated camera-space position
    m = frags.mask[0]
    assert m.float().mean() > 0.3
    ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    ray = torch.stack([(jj + 0.5 - k[0, 2]) / k[0, 0], (ii + 0.5 - k[1, 2]) / k[1, 1], torch.ones_like(ii)], -1)
    t_hit = 2.0 * (-n[2]) / (-(ray @ n))  # ray-plane intersection, (H, W) with ray z = 1
    truth = ray * t_hit[..., None]
    torch.testing.assert_close(pos[m], truth[m], atol=1e-10, rtol=0)
    torch.testing.assert_close(frags.depth[0][m], t_hit[m], atol=1e-10, rtol=0)
    # screen-space (affine) interpolation would be visibly wrong here
    assert (frags.bary[0][m].sum(-1) - 1).abs().max() < 1e-12


def test_interpolate_constants_and_onehot(gen):
    h, w = 30, 22
    k = _k(h, w)
    tris = _soup(gen, 8)
    verts, faces = _separate(tris)
    frags = rasterize(_project(verts, k)[None], faces, h, w)
    nv = verts.shape[0]
    attrs = torch.cat([torch.full((1, nv, 1), 3.5, dtype=torch.float64), torch.eye(nv, dtype=torch.float64)[None]], -1)
    out = interpolate(attrs, faces, frags)
    m = frags.mask[0]
    assert out.shape == (1, h, w, 1 + nv)
    torch.testing.assert_close(out[0, ..., 0][m], torch.full_like(out[0, ..., 0][m], 3.5))
    assert (out[0][~m] == 0).all()
    ids = frags.tri_id[0][m]
    onehot = out[0, ..., 1:][m]  # (P, Nv)
    got = torch.gather(onehot, 1, faces[ids])
    torch.testing.assert_close(got, frags.bary[0][m])
    torch.testing.assert_close(onehot.sum(-1), torch.ones_like(onehot[:, 0]))


def test_empty_inputs():
    pix = torch.rand(2, 5, 3)
    empty_faces = torch.zeros(0, 3, dtype=torch.int64)
    frags = rasterize(pix, empty_faces, 8, 9)
    assert frags.tri_id.shape == (2, 8, 9) and (frags.tri_id == -1).all() and not frags.mask.any()
    behind = pix.clone()
    behind[..., 2] = -1
    assert not rasterize(behind, torch.tensor([[0, 1, 2]]), 8, 9, cull_backfaces=False).mask.any()


@pytest.mark.parametrize("case, exc, match", [
    (dict(verts_pix=torch.rand(4, 3)), ValueError, "shape"),
    (dict(verts_pix=torch.rand(1, 4, 2)), ValueError, "shape"),
    (dict(verts_pix=torch.ones(1, 4, 3, dtype=torch.int64)), ValueError, "floating"),
    (dict(verts_pix="nan"), ValueError, "NaN"),
    (dict(verts_pix=[[[0.0, 0.0, 1.0]]]), TypeError, "torch.Tensor"),
    (dict(faces=torch.tensor([[0, 1, 4]])), ValueError, "4 vertices"),
    (dict(faces=torch.tensor([[0, -1, 2]])), ValueError, "vertices"),
    (dict(faces=torch.tensor([[0.0, 1.0, 2.0]])), ValueError, "int64"),
    (dict(faces=torch.tensor([0, 1, 2])), ValueError, r"\(F, 3\)"),
    (dict(height=0), ValueError, "height"),
    (dict(width=12.0), ValueError, "width"),
    (dict(near=0.0), ValueError, "near"),
])
def test_bad_inputs_raise(case, exc, match):
    args = dict(verts_pix=torch.rand(1, 4, 3) + 1, faces=torch.tensor([[0, 1, 2]]), height=8, width=8, near=1e-4)
    args.update(case)
    if isinstance(args["verts_pix"], str):
        args["verts_pix"] = torch.rand(1, 4, 3)
        args["verts_pix"][0, 2, 1] = float("nan")
    with pytest.raises(exc, match=match):
        rasterize(args["verts_pix"], args["faces"], args["height"], args["width"], near=args["near"])


def test_interpolate_bad_inputs():
    pix = torch.rand(2, 4, 3) + 1
    faces = torch.tensor([[0, 1, 2]])
    frags = rasterize(pix, faces, 8, 8)
    with pytest.raises(ValueError, match="N=2"):
        interpolate(torch.rand(1, 4, 3), faces, frags)
    with pytest.raises(ValueError, match="NaN"):
        interpolate(torch.full((2, 4, 3), float("nan")), faces, frags)
    with pytest.raises(TypeError, match="Fragments"):
        interpolate(torch.rand(2, 4, 3), faces, (frags.tri_id,))
    with pytest.raises(ValueError, match="vertices"):
        interpolate(torch.rand(2, 2, 3), faces, frags)


def _uv_sphere(n_lat=50, n_lon=100, radius=1.0):
    """Closed UV sphere ((n_lat-1)*n_lon + 2 vertices, 2*n_lon*(n_lat-1) faces), CCW outward."""
    th = torch.arange(1, n_lat, dtype=torch.float64) * math.pi / n_lat
    ph = torch.arange(n_lon, dtype=torch.float64) * 2 * math.pi / n_lon
    th, ph = torch.meshgrid(th, ph, indexing="ij")
    ring = torch.stack([th.sin() * ph.sin(), th.cos(), th.sin() * ph.cos()], -1).reshape(-1, 3)
    verts = torch.cat([ring, torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)]) * radius
    top, bot = len(ring), len(ring) + 1
    faces = []
    for j in range(n_lon):
        jn = (j + 1) % n_lon
        faces.append([top, j, jn])
        last = (n_lat - 2) * n_lon
        faces.append([bot, last + jn, last + j])
        for i in range(n_lat - 2):
            a, b, c, d = i * n_lon + j, i * n_lon + jn, (i + 1) * n_lon + jn, (i + 1) * n_lon + j
            faces += [[a, d, c], [a, c, b]]
    faces = torch.tensor(faces)
    n = torch.linalg.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    flip = (n * verts[faces].mean(1)).sum(-1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return verts, faces


def test_closed_mesh_culling_keeps_the_visible_surface():
    h, w = 64, 80
    k = _k(h, w)
    v, f = _uv_sphere(12, 24, 0.5)
    cam = v + torch.tensor([0.1, -0.05, 2.0], dtype=torch.float64)
    pix = _project(cam, k)[None]
    a, b = rasterize(pix, f, h, w), rasterize(pix, f, h, w, cull_backfaces=False)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.tri_id, b.tri_id)
    assert torch.allclose(a.depth, b.depth)
    hit = a.tri_id[a.mask].unique()
    tri = cam[f[hit]]
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert ((n * tri[:, 0]).sum(-1) < 0).all()
