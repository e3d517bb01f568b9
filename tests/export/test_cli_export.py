"""`mvportrait export onnx`: files, report, parity numbers, options and errors."""
import importlib.util
import json

import pytest

pytest.importorskip("onnxruntime", reason="parity checks need onnxruntime: pip install 'mvportrait[export]'")

from mvportrait.cli import main  # noqa: E402
from mvportrait.engine.text2flame import DEFAULT_WEIGHTS as STAGE1_WEIGHTS  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(micro_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    micro_model.save_pretrained(folder, dtype=__import__("torch").float32)
    return folder


def test_export_onnx_writes_checked_files_and_a_report(checkpoint, tmp_path, capsys):
    out = tmp_path / "onnx"
    rc = main(["export", "onnx", "--model", str(checkpoint), "--stage1", "none", "--out", str(out),
               "--networks", "unet,vae_decoder,reference", "--dim", "unet.h=2:4:8", "--dim", "unet.w=2:4:8",
               "--seed", "7"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "unet" in text and "parity at 2 shapes" in text and "FAILED" not in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] and set(rep["networks"]) == {"unet", "vae_decoder", "reference"}
    unet = rep["networks"]["unet"]
    assert (out / "unet" / "model.onnx").is_file() and (out / "unet" / "spec.json").is_file()
    assert unet["spec"]["dims"]["h"][:3] == [2, 4, 8] and unet["parity"]["seed"] == 7
    pts = unet["parity"]["points"]
    assert [p["point"]["h"] for p in pts] == [4, 2]
    assert all(o["max_abs"] < 1e-4 and "max_rel" in o for p in pts for o in p["outputs"].values())
    assert unet["inferred_outputs"]["out"][3] == 4
    assert rep["networks"]["reference"]["bytes"] > 0 and not unet["external_data"]


def test_export_onnx_external_data_and_opset(checkpoint, tmp_path):
    out = tmp_path / "o"
    assert main(["export", "onnx", "--model", str(checkpoint), "--stage1", "none", "--out", str(out),
                 "--networks", "flame_encoder", "--external-data", "always", "--opset", "18"]) == 0
    assert (out / "flame_encoder" / "model.onnx.data").is_file()
    assert json.loads((out / "report.json").read_text())["opset"] == 18


@pytest.mark.skipif(not (STAGE1_WEIGHTS / "motion.json").is_file(), reason="no shipped stage-1 weights")
def test_export_onnx_stage1(checkpoint, tmp_path):
    out = tmp_path / "s1"
    assert main(["export", "onnx", "--model", str(checkpoint), "--out", str(out),
                 "--networks", "motion_dm,emotion_dm"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] and rep["stage1"].startswith("stage 1 from")
    assert len(rep["networks"]["motion_dm"]["parity"]["points"]) == 2


def test_export_errors(checkpoint, tmp_path, capsys):
    base = ["export", "onnx", "--model", str(checkpoint), "--stage1", "none", "--out", str(tmp_path / "e")]
    assert main(base + ["--networks", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(base + ["--dim", "h=1:2"]) == 2
    assert main(base + ["--opset", "23"]) == 2
    assert main(["export", "onnx", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "e")]) == 2
    if importlib.util.find_spec("tensorrt") is None:
        assert main(["export", "tensorrt", "--model", str(checkpoint), "--stage1", "none"]) == 2
        assert "TensorRT is not installed on this machine" in capsys.readouterr().err


def test_low_memory_export(checkpoint, tmp_path):
    out = tmp_path / "lm"
    assert main(["export", "onnx", "--model", str(checkpoint), "--stage1", "none", "--out", str(out),
                 "--networks", "reference,unet", "--low-memory", "--seed", "1"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] and len(rep["networks"]["unet"]["parity"]["points"]) == 2
