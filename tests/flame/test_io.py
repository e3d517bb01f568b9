"""FLAME model / landmark / sequence files: FLAME-layout pickles, our npz, tracker outputs."""
import importlib.util
import logging
import pickle

import numpy as np
import pytest
import torch

from mvportrait.flame import io as fio
from mvportrait.flame.io import (SEQUENCE_FORMAT, convert, load_flame, load_landmark_embedding, load_sequence,
                                 save_npz, save_sequence)
from mvportrait.flame.params import FlameParams
from mvportrait.flame.unpickle import UnsafePickleError

NV, NF, NS, NE = 50, 80, 10, 5


@pytest.fixture
def fake(fake_modules):
    return fake_modules


def flame_arrays(seed=0):
    rng = np.random.default_rng(seed)
    jr = np.zeros((5, NV))
    for j in range(5):
        idx = rng.choice(NV, 6, replace=False)
        jr[j, idx] = rng.random(6)
        jr[j] /= jr[j].sum()
    w = rng.random((NV, 5)) ** 4
    return {
        "v_template": rng.normal(size=(NV, 3)) * 0.1,
        "f": rng.integers(0, NV, size=(NF, 3)).astype(np.uint32),
        "shapedirs": rng.normal(size=(NV, 3, NS + NE)) * 0.01,
        "posedirs": rng.normal(size=(NV, 3, 36)) * 0.01,
        "J_regressor": jr,
        "weights": w / w.sum(1, keepdims=True),
        "kintree_table": np.array([[0xFFFFFFFF, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32),
    }


def flame_pickle(fake, arrays, sparse="fake", drop=()):
    """Bytes of a pickle laid out like FLAME 2020's generic_model.pkl (py2 str keys, chumpy, sparse J)."""
    if sparse == "fake":
        jreg = fake.csc_matrix(arrays["J_regressor"])
    else:
        import scipy.sparse as sp
        jreg = sp.csc_matrix(arrays["J_regressor"])
    d = {"f": arrays["f"], "v_template": fake.Ch(arrays["v_template"]), "shapedirs": fake.Ch(arrays["shapedirs"]),
         "posedirs": arrays["posedirs"], "J_regressor": jreg, "weights": fake.Ch(arrays["weights"]),
         "kintree_table": arrays["kintree_table"], "J": fake.Ch(arrays["J_regressor"] @ arrays["v_template"]),
         "bs_style": b"lbs", "bs_type": b"lrotmin"}
    d = {k: v for k, v in d.items() if k not in drop}
    if sparse != "fake":
        return pickle.dumps(d, protocol=2)
    return fake.dumps({k.encode(): v for k, v in d.items()})  # Python 2 str keys


def random_params(b=2, t=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, k=0.3: torch.randn(*s, generator=g) * k  # noqa: E731
    return FlameParams(shape=r(b, NS, k=1.0), expression=r(b, t, NE, k=1.0), global_pose=r(b, t, 3),
                       neck_pose=r(b, t, 3), jaw_pose=r(b, t, 3), eye_pose=r(b, t, 6), translation=r(b, t, 3))


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("sparse", ["fake", "scipy"])
def test_pickle_npz_round_trip(fake, tmp_path, sparse):
    if sparse == "scipy" and importlib.util.find_spec("scipy") is None:
        pytest.skip("scipy not installed: the real scipy.sparse pickle path cannot be built")
    arrays = flame_arrays()
    pkl = tmp_path / "generic_model.pkl"
    pkl.write_bytes(flame_pickle(fake, arrays, sparse=sparse))
    if sparse == "fake":
        assert b"cchumpy.ch\nCh\n" in pkl.read_bytes() and b"cscipy.sparse.csc\ncsc_matrix\n" in pkl.read_bytes()

    m1 = load_flame(pkl, n_shape=NS, dtype=torch.float64)
    assert m1.parents.tolist() == [-1, 0, 1, 1, 1] and m1.faces.dtype == torch.int64
    assert (m1.n_vertices, m1.n_faces, m1.n_shape, m1.n_expr) == (NV, NF, NS, NE)
    np.testing.assert_array_equal(m1.exprdirs.numpy(), arrays["shapedirs"][..., NS:])
    np.testing.assert_array_equal(m1.j_regressor.numpy(), arrays["J_regressor"])
    np.testing.assert_array_equal(m1.faces.numpy(), arrays["f"].astype(np.int64))

    npz = tmp_path / "flame.npz"
    save_npz(m1, npz)
    m2 = load_flame(npz, dtype=torch.float64)
    for key, value in m1.arrays().items():
        assert torch.equal(value, m2.arrays()[key]), key
    assert m2.name == m1.name and m2.expr_names == m1.expr_names

    params = random_params().to(dtype=torch.float64)
    v1, v2 = m1(params).vertices, m2(params).vertices
    assert v1.shape == (2, 3, NV, 3) and torch.equal(v1, v2)
    rest = m1(FlameParams.zeros(1, 1, NS, NE, dtype=torch.float64)).vertices[0, 0]
    torch.testing.assert_close(rest, m1.v_template)


def test_format_detected_from_content_not_name(fake, tmp_path):
    arrays = flame_arrays()
    (tmp_path / "looks_like.npz").write_bytes(flame_pickle(fake, arrays))
    m = load_flame(tmp_path / "looks_like.npz", n_shape=NS)
    save_npz(m, tmp_path / "looks_like.pkl")
    m2 = load_flame(tmp_path / "looks_like.pkl")
    assert torch.equal(m.shapedirs, m2.shapedirs) and m2.dtype == torch.float32


def test_convert_and_float32_default(fake, tmp_path):
    (tmp_path / "g.pkl").write_bytes(flame_pickle(fake, flame_arrays()))
    model = convert(tmp_path / "g.pkl", tmp_path / "g.npz", n_shape=NS)
    with np.load(tmp_path / "g.npz", allow_pickle=False) as z:
        assert z["shapedirs"].dtype == np.float32 and int(z["format_version"]) == 1 and str(z["name"]) == "g"
    assert torch.equal(load_flame(tmp_path / "g.npz").v_template, model.v_template)


@pytest.mark.parametrize("drop,match", [("weights", "'weights'"), ("kintree_table", "'kintree_table'"),
                                        ("J_regressor", "'J_regressor'")])
def test_pickle_missing_key_is_named(fake, tmp_path, drop, match):
    (tmp_path / "g.pkl").write_bytes(flame_pickle(fake, flame_arrays(), drop=(drop,)))
    with pytest.raises(ValueError, match=match):
        load_flame(tmp_path / "g.pkl", n_shape=NS)


@pytest.mark.parametrize("key,value,match", [
    ("posedirs", np.zeros((NV, 3, 30)), r"'posedirs' has shape \(50, 3, 30\)"),
    ("weights", np.zeros((NV, 4)), "'weights'"),
    ("f", np.zeros((NF, 3)), "'f' must hold integer"),
    ("kintree_table", np.array([[7, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32), "root parent"),
])
def test_pickle_wrong_arrays_are_named(fake, tmp_path, key, value, match):
    arrays = flame_arrays()
    arrays[key] = value
    (tmp_path / "g.pkl").write_bytes(flame_pickle(fake, arrays))
    with pytest.raises(ValueError, match=match):
        load_flame(tmp_path / "g.pkl", n_shape=NS)


def test_n_shape_out_of_range(fake, tmp_path):
    (tmp_path / "g.pkl").write_bytes(flame_pickle(fake, flame_arrays()))
    with pytest.raises(ValueError, match="n_shape=300"):
        load_flame(tmp_path / "g.pkl")  # default 300 > 15 components in this small file


def _saved_npz(fake, tmp_path):
    (tmp_path / "g.pkl").write_bytes(flame_pickle(fake, flame_arrays()))
    save_npz(load_flame(tmp_path / "g.pkl", n_shape=NS), tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("key", ["posedirs", "weights", "expr_names", "format_version"])
def test_npz_missing_key_is_named(fake, tmp_path, key):
    d = _saved_npz(fake, tmp_path)
    del d[key]
    np.savez(tmp_path / "bad.npz", **d)
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_flame(tmp_path / "bad.npz")


@pytest.mark.parametrize("key,value", [("weights", np.zeros((NV, 4), np.float32)),
                                       ("shapedirs", np.zeros((NV, 3), np.float32)),
                                       ("faces", np.zeros((NF, 3), np.float32))])
def test_npz_wrong_shape_is_named(fake, tmp_path, key, value):
    d = _saved_npz(fake, tmp_path)
    d[key] = value
    np.savez(tmp_path / "bad.npz", **d)
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_flame(tmp_path / "bad.npz")


def test_npz_newer_format_version_refused(fake, tmp_path):
    d = _saved_npz(fake, tmp_path)
    d["format_version"] = np.array(99)
    np.savez(tmp_path / "new.npz", **d)
    with pytest.raises(ValueError, match="format_version"):
        load_flame(tmp_path / "new.npz")


def test_save_npz_is_atomic(fake, tmp_path, monkeypatch):
    (tmp_path / "g.pkl").write_bytes(flame_pickle(fake, flame_arrays()))
    model = load_flame(tmp_path / "g.pkl", n_shape=NS)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fio.np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        save_npz(model, tmp_path / "out.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.pkl"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_npz(model, tmp_path / "missing_dir" / "out.npz")


def test_not_a_model_file(tmp_path):
    (tmp_path / "x.pkl").write_bytes(b"hello world, not a model")
    with pytest.raises(ValueError, match="neither a FLAME pickle"):
        load_flame(tmp_path / "x.pkl")
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(ValueError, match="npy"):
        load_flame(tmp_path / "a.npy")


def test_malicious_model_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    (tmp_path / "generic_model.pkl").write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        load_flame(tmp_path / "generic_model.pkl")
    assert not marker.exists()


# -------------------------------------------------------------------------- landmarks
def _embedding(n, seed=0):
    rng = np.random.default_rng(seed)
    bary = rng.random((n, 3))
    return rng.integers(0, NF, n), bary / bary.sum(1, keepdims=True)


def test_landmarks_flame_static_pickle(fake, tmp_path):
    faces, bary = _embedding(51)
    (tmp_path / "flame_static_embedding.pkl").write_bytes(
        fake.dumps({b"lmk_face_idx": faces.astype(np.uint32), b"lmk_b_coords": bary}))
    f, b = load_landmark_embedding(tmp_path / "flame_static_embedding.pkl")
    assert f.dtype == np.int64 and f.shape == (51,) and np.array_equal(f, faces) and np.array_equal(b, bary)


def test_landmarks_deca_npy_prefers_full_68(tmp_path):
    full_f, full_b = _embedding(68, 1)
    st_f, st_b = _embedding(51, 2)
    d = {"static_lmk_faces_idx": st_f, "static_lmk_bary_coords": st_b, "dynamic_lmk_faces_idx": np.zeros((79, 17)),
         "dynamic_lmk_bary_coords": np.zeros((79, 17, 3)), "full_lmk_faces_idx": full_f[None],
         "full_lmk_bary_coords": full_b[None]}
    np.save(tmp_path / "landmark_embedding.npy", d, allow_pickle=True)
    f, b = load_landmark_embedding(tmp_path / "landmark_embedding.npy")
    assert f.shape == (68,) and np.array_equal(f, full_f) and np.array_equal(b, full_b)
    del d["full_lmk_faces_idx"], d["full_lmk_bary_coords"]
    np.save(tmp_path / "static_only.npy", d, allow_pickle=True)
    f, b = load_landmark_embedding(tmp_path / "static_only.npy")
    assert f.shape == (51,) and np.array_equal(f, st_f)


@pytest.mark.parametrize("keys", [("lmk_faces_idx", "lmk_bary_coords"), ("lmk_face_idx", "lmk_b_coords")])
def test_landmarks_npz(tmp_path, keys):
    faces, bary = _embedding(68)
    np.savez(tmp_path / "lmk.npz", **{keys[0]: faces, keys[1]: bary})
    f, b = load_landmark_embedding(tmp_path / "lmk.npz")
    assert np.array_equal(f, faces) and np.allclose(b, bary)


def test_landmarks_bad_layouts(tmp_path):
    np.savez(tmp_path / "wrong.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="lmk_face_idx"):
        load_landmark_embedding(tmp_path / "wrong.npz")
    faces, bary = _embedding(10)
    np.savez(tmp_path / "mismatch.npz", lmk_faces_idx=faces, lmk_bary_coords=bary[:9])
    with pytest.raises(ValueError, match="'lmk_bary_coords' has shape"):
        load_landmark_embedding(tmp_path / "mismatch.npz")


def test_load_flame_with_landmarks_and_npz_keeps_them(fake, tmp_path):
    (tmp_path / "g.pkl").write_bytes(flame_pickle(fake, flame_arrays()))
    faces, bary = _embedding(68)
    np.savez(tmp_path / "lmk.npz", lmk_faces_idx=faces, lmk_bary_coords=bary)
    m = load_flame(tmp_path / "g.pkl", n_shape=NS, landmarks=tmp_path / "lmk.npz")
    out = m(random_params())
    assert out.landmarks.shape == (2, 3, 68, 3)
    save_npz(m, tmp_path / "m.npz")
    m2 = load_flame(tmp_path / "m.npz")
    assert torch.equal(m2.lmk_faces_idx, m.lmk_faces_idx) and torch.equal(m2(random_params()).landmarks, out.landmarks)
    assert load_landmark_embedding(tmp_path / "m.npz")[0].shape == (68,)


# -------------------------------------------------------------------------- sequences
def test_sequence_round_trip_single(tmp_path):
    p = FlameParams(shape=torch.randn(1, NS), expression=torch.randn(1, 7, NE), jaw_pose=torch.randn(1, 7, 3),
                    eye_pose=torch.randn(1, 7, 6), fps=30)
    save_sequence(tmp_path / "s.npz", p)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        assert str(z["format"]) == SEQUENCE_FORMAT and z["shape"].shape == (NS,) and z["expression"].shape == (7, NE)
    q = load_sequence(tmp_path / "s.npz")
    assert q.fps == 30 and q.batch_size == 1 and q.num_frames == 7
    for name in ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose", "translation"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name


def test_sequence_round_trip_batched_per_frame_shape(tmp_path):
    p = random_params(b=3, t=4)
    p = FlameParams(shape=torch.randn(3, 4, NS), expression=p.expression, global_pose=p.global_pose,
                    neck_pose=p.neck_pose, translation=p.translation, fps=24)
    save_sequence(tmp_path / "s.npz", p)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        assert z["shape"].shape == (3, 4, NS)
    q = load_sequence(tmp_path / "s.npz")
    assert q.batch_size == 3 and q.fps == 24
    assert torch.equal(q.shape, p.shape) and torch.equal(q.full_pose(), p.full_pose())
    assert torch.equal(q.translation, p.translation)


def test_sequence_batched_shape_given_once(tmp_path):
    np.savez(tmp_path / "s.npz", shape=np.ones(4, np.float32), expression=np.zeros((2, 5, 3), np.float32))
    q = load_sequence(tmp_path / "s.npz")
    assert q.shape.shape == (2, 5, 4) and bool((q.shape == 1).all())


def test_sequence_deca_aliases(tmp_path, caplog):
    rng = np.random.default_rng(0)
    t = 6
    shape, exp, pose = rng.normal(size=(t, 100)), rng.normal(size=(t, 50)), rng.normal(size=(t, 6)) * 0.1
    np.savez(tmp_path / "deca.npz", shapecode=shape, expcode=exp, posecode=pose, cam=rng.normal(size=(t, 3)),
             texcode=rng.normal(size=(t, 50)))
    with caplog.at_level(logging.INFO, logger="mvportrait.flame.io"):
        q = load_sequence(tmp_path / "deca.npz", n_shape=300, n_expr=100, fps=30)
    assert "'cam'" in caplog.text and q.fps == 30
    assert q.shape.shape == (1, t, 300) and q.expression.shape == (1, t, 100)
    np.testing.assert_allclose(q.expression[0, :, :50].numpy(), exp.astype(np.float32))
    assert not q.expression[..., 50:].any() and not q.shape[..., 100:].any()
    np.testing.assert_allclose(q.global_pose[0].numpy(), pose[:, :3].astype(np.float32))
    np.testing.assert_allclose(q.jaw_pose[0].numpy(), pose[:, 3:].astype(np.float32))
    assert not q.neck_pose.any() and not q.eye_pose.any()
    np.savez(tmp_path / "emoca.npz", shape=shape, exp=exp, pose=pose)
    assert torch.equal(load_sequence(tmp_path / "emoca.npz").jaw_pose, q.jaw_pose)


def test_sequence_smirk_aliases(tmp_path, caplog):
    t = 4
    np.savez(tmp_path / "smirk.npz", shape_params=np.ones((t, 300)), expression_params=np.full((t, 50), 0.5),
             pose_params=np.full((t, 3), 0.1), jaw_params=np.full((t, 3), 0.2), eyelid_params=np.zeros((t, 2)),
             cam=np.zeros((t, 3)))
    with caplog.at_level(logging.WARNING, logger="mvportrait.flame.io"):
        q = load_sequence(tmp_path / "smirk.npz", n_expr=20)
    assert "eyelid_params" in caplog.text and "dropping expression" in caplog.text
    assert q.expression.shape == (1, t, 20) and bool((q.expression == 0.5).all())
    assert bool((q.global_pose == 0.1).all()) and bool((q.jaw_pose == 0.2).all())


def test_sequence_generic_tracker_aliases(tmp_path):
    t = 3
    np.savez(tmp_path / "trk.npz", expr=np.zeros((t, 10)), rotation=np.full((t, 3), 0.1), neck_pose=np.full((t, 3), 0.2),
             jaw_pose=np.full((t, 3), 0.3), eyes=np.full((t, 6), 0.4), transl=np.full((t, 3), 0.5), fps=np.array(50))
    q = load_sequence(tmp_path / "trk.npz")
    assert q.fps == 50
    for name, v in (("global_pose", 0.1), ("neck_pose", 0.2), ("jaw_pose", 0.3), ("eye_pose", 0.4), ("translation", 0.5)):
        torch.testing.assert_close(getattr(q, name), torch.full_like(getattr(q, name), v))
    np.savez(tmp_path / "full.npz", expression=np.zeros((t, 4)), full_pose=np.arange(15.0)[None].repeat(t, 0))
    q = load_sequence(tmp_path / "full.npz")
    assert q.full_pose()[0, 0].tolist() == list(range(15))


@pytest.mark.parametrize("arrays,match", [
    (dict(expression=np.zeros((3, 5)), foo=np.zeros(3), bar=np.zeros(3)), r"unknown key\(s\) 'foo', 'bar'.*expression"),
    (dict(jaw_pose=np.zeros((3, 3))), "no expression"),
    (dict(expression=np.zeros((3, 5)), exp=np.zeros((3, 5))), "'expression' and 'exp' both give expression"),
    (dict(expression=np.zeros((3, 5)), pose=np.zeros((3, 6)), jaw_pose=np.zeros((3, 3))), "'pose' and 'jaw_pose'"),
    (dict(expression=np.full((3, 5), np.nan)), "'expression' contains NaN"),
    (dict(expression=np.zeros((3, 5)), trans=np.array([[0, 0, np.inf]] * 3)), "'trans' contains NaN or Inf"),
    (dict(expression=np.zeros((3, 5)), jaw_pose=np.zeros((4, 3))), "frame count: expression 3, jaw_pose 4"),
    (dict(expression=np.zeros((2, 3, 5)), jaw_pose=np.zeros((3, 3))), r"all be \(T, D\) or all \(B, T, D\)"),
    (dict(expression=np.zeros((3, 5)), jaw_pose=np.zeros((3, 4))), r"'jaw_pose' \(jaw_pose\) must be \(T, 3\)"),
    (dict(expression=np.zeros((3, 5)), eyes=np.zeros((3, 3))), r"'eyes' \(eye_pose\) must be \(T, 6\)"),
    (dict(expression=np.zeros((4, 5)), rotation=np.zeros((4, 3, 3))), "'rotation' looks like rotation matrices"),
    (dict(expression=np.zeros((3, 5)), pose=np.zeros((3, 3))), r"'pose' must be \(T, 6\)"),
    (dict(expression=np.zeros((3, 5)), shape=np.zeros((4, 2))), "shape has shape"),
    (dict(expression=np.zeros((3, 5)), format=np.array("other-v9")), "format"),
    (dict(expression=np.zeros((3, 5)), fps=np.array(-1.0)), "'fps'"),
    (dict(expression=np.array(["a", "b"])), "'expression' has dtype"),
])
def test_sequence_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_sequence(tmp_path / "bad.npz")


def test_sequence_pose_only_needs_n_expr(tmp_path):
    np.savez(tmp_path / "motion.npz", global_pose=np.zeros((5, 3)), neck_pose=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="n_expr"):
        load_sequence(tmp_path / "motion.npz")
    q = load_sequence(tmp_path / "motion.npz", n_expr=7, n_shape=4)
    assert q.expression.shape == (1, 5, 7) and q.shape.shape == (1, 5, 4) and not q.expression.any()


def test_sequence_truncate_and_pad(tmp_path):
    np.savez(tmp_path / "s.npz", shape=np.arange(6.0), expression=np.arange(8.0)[None].repeat(2, 0))
    q = load_sequence(tmp_path / "s.npz", n_shape=3, n_expr=10)
    assert q.shape[0, 0].tolist() == [0, 1, 2] and q.expression[0, 0].tolist() == list(range(8)) + [0, 0]
    with pytest.raises(ValueError, match="n_expr"):
        load_sequence(tmp_path / "s.npz", n_expr=-1)


def test_sequence_rejects_non_npz_and_pickles(tmp_path):
    (tmp_path / "a.npz").write_text("expression,1,2,3\n")
    with pytest.raises(ValueError, match="not an .npz"):
        load_sequence(tmp_path / "a.npz")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    (tmp_path / "b.npz").write_bytes(pickle.dumps({"expression": Evil()}))
    with pytest.raises(ValueError, match="not an .npz"):
        load_sequence(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", expression=np.array([Evil()], dtype=object))
    with pytest.raises(ValueError, match="readable .npz"):
        load_sequence(tmp_path / "c.npz")
    assert not marker.exists()


def test_sequence_drives_the_model(fake, tmp_path):
    (tmp_path / "g.pkl").write_bytes(flame_pickle(fake, flame_arrays()))
    model = load_flame(tmp_path / "g.pkl", n_shape=NS)
    np.savez(tmp_path / "deca.npz", shapecode=np.zeros((4, 100)), expcode=np.zeros((4, 50)), posecode=np.zeros((4, 6)))
    p = load_sequence(tmp_path / "deca.npz", n_shape=model.n_shape, n_expr=model.n_expr)
    assert model(p).vertices.shape == (1, 4, NV, 3)
