"""The command line, called in-process (python -m mvportrait ... behaves the same)."""
import json

import numpy as np
import pytest
from PIL import Image

from mvportrait.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["synthetic_head"].startswith("FlameModel('synthetic")
    assert "torch" in info and "MVP_KERNELS" in info


def test_render_demo_png_rows_frames_cols_views(tmp_path):
    out = tmp_path / "grid.png"
    rc = main(["render", "--demo", "--views", "ring-4", "--size", "48", "--seconds", "1", "--fps", "6",
               "--out", str(out), "-q"])
    assert rc == 0
    img = np.asarray(Image.open(out))
    assert 4 * 48 <= img.shape[1] < 5 * 48 and 6 * 48 <= img.shape[0] < 7 * 48  # 6 frames x 4 views
    assert img.std() > 10  # not a blank picture


def test_render_mp4_per_view_and_normal_mode(tmp_path):
    from mvportrait.render.video import read_video

    out = tmp_path / "n.mp4"
    assert main(["render", "--size", "32", "--seconds", "0.5", "--fps", "8", "--mode", "normal",
                 "--views", "arc-2", "--per-view", "--out", str(out), "-q"]) == 0
    frames = read_video(out)
    assert frames.shape[0] == 4
    assert (tmp_path / "n_view0.mp4").exists() and (tmp_path / "n_view1.mp4").exists()


def test_render_params_file(tmp_path):
    import torch

    from mvportrait.flame.io import save_sequence
    from mvportrait.flame.params import FlameParams

    seq = tmp_path / "seq.npz"
    jaw = torch.zeros(1, 3, 3)
    jaw[..., 0] = torch.tensor([0.0, 0.15, 0.3])
    save_sequence(seq, FlameParams(shape=torch.zeros(1, 300), expression=torch.zeros(1, 3, 100), jaw_pose=jaw, fps=10))
    out = tmp_path / "p.png"
    assert main(["render", "--params", str(seq), "--size", "32", "--views", "front", "--out", str(out), "-q"]) == 0
    assert out.exists()


@pytest.mark.parametrize("argv,match", [
    (["render", "--out", "x.gif"], "--out"),
    (["render", "--model", "/nonexistent/flame.pkl", "--out", "x.png"], "no such file"),
    (["render", "--views", "spiral-3", "--out", "x.png", "--size", "32"], "spiral"),
    (["render", "--size", "4", "--out", "x.png"], "--size"),
    (["flame", "convert", "/nonexistent.pkl", "out.npz"], "does not exist"),
    (["train", "stage1", "--out", "run", "--amp"], "--amp"),
    (["train", "stage1", "--out", "run", "--text-model", "/nonexistent/minilm"], "--text-model"),
    (["train", "stage1", "--out", "run", "--captions-per-clip", "0"], "--captions-per-clip"),
])
def test_bad_arguments_exit_2_with_message(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and match in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_unknown_option_is_rejected():
    with pytest.raises(SystemExit) as e:
        main(["render", "--frobnicate"])
    assert e.value.code == 2


def test_flame_convert_pickle_to_npz_and_info(tmp_path, capsys):
    """A FLAME-layout pickle (plain numpy arrays here; chumpy/scipy objects are covered in
    tests/flame) converts to npz and loads back with identical arrays."""
    import pickle

    from mvportrait.flame.io import load_flame
    from mvportrait.flame.synthetic import synthetic_head

    m = synthetic_head(0, flame_size=True).model
    a = {k: v.numpy() for k, v in m.arrays().items()}
    flame = {"v_template": a["v_template"].astype(np.float64), "f": a["faces"].astype(np.uint32),
             "shapedirs": np.concatenate([a["shapedirs"], a["exprdirs"]], -1).astype(np.float64),
             "posedirs": a["posedirs"].astype(np.float64), "J_regressor": a["j_regressor"].astype(np.float64),
             "weights": a["weights"].astype(np.float64),
             "kintree_table": np.array([[0xFFFFFFFF, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32),
             "bs_style": "lbs", "bs_type": "lrotmin"}
    src, dst = tmp_path / "generic_model.pkl", tmp_path / "flame.npz"
    src.write_bytes(pickle.dumps(flame, protocol=2))
    assert main(["flame", "convert", str(src), str(dst)]) == 0
    back = load_flame(dst)
    assert back.n_vertices == 5023 and back.n_shape == 300 and back.n_expr == 100
    assert back.parents.tolist() == [-1, 0, 1, 1, 1]
    np.testing.assert_allclose(back.posedirs.numpy(), a["posedirs"], atol=1e-7)
    capsys.readouterr()
    assert main(["flame", "info", str(dst)]) == 0
    assert "vertices=5023" in capsys.readouterr().out


def test_flame_convert_refuses_malicious_pickle(tmp_path, capsys):
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = tmp_path / "model.pkl"
    src.write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    assert main(["flame", "convert", str(src), str(tmp_path / "out.npz")]) == 2
    err = capsys.readouterr().err
    assert "system" in err and not marker.exists() and not (tmp_path / "out.npz").exists()


def test_train_stage1_device_and_eval_weights_dir(tmp_path, capsys):
    import torch

    run = tmp_path / "run"
    base = ["train", "stage1", "--config", "tiny", "--text-cond", "tokens", "--text-encoder", "hashing", "--steps", "2",
            "--batch", "2", "--corpus-size", "4", "--captions-per-clip", "1", "--warmup", "1", "-q"]
    if not torch.cuda.is_available():
        assert main(base + ["--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(base + ["--out", str(run), "--device", "cpu", "--threads", "1"]) == 0
    assert "on cpu" in capsys.readouterr().out
    # tiny trains 32-frame windows; eval generates windows of that length
    out = tmp_path / "eval.json"
    assert main(["eval", "stage1", "--weights", str(run / "final"), "--steps", "1", "--n", "4", "--batch", "2",
                 "--no-smooth-compare", "--split", "train", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "motion_acc=" in text and out.is_file()
