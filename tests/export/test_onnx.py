"""ONNX export: every network exports, passes onnx.checker + strict shape inference, and matches PyTorch
in ONNX Runtime on fresh random inputs at two shapes of its dynamic range."""
import json

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install 'mvportrait[export]'")
pytest.importorskip("onnxruntime", reason="parity checks need onnxruntime: pip install 'mvportrait[export]'")

from mvportrait.export.onnx import (check_onnx, check_parity, export_onnx, module_fingerprint,  # noqa: E402
                                    onnx_key_fields)
from mvportrait.export.spec import stage1_specs, stage2_specs  # noqa: E402


@pytest.fixture(scope="module")
def exported(micro_model, stage1_nets, tmp_path_factory):
    """Every micro network exported once (opset 17): {name: (spec, path)}."""
    out = tmp_path_factory.mktemp("onnx")
    specs = {**stage2_specs(micro_model), **stage1_specs(*stage1_nets, max_tokens=32)}
    return {n: (s, export_onnx(s, out / n / "model.onnx")) for n, s in specs.items()}


NETWORKS = ["vae_encoder", "reference", "flame_encoder", "unet", "vae_decoder", "motion_dm", "emotion_dm",
            "text_encoder"]


@pytest.mark.parametrize("name", NETWORKS)
def test_parity_at_two_shapes(exported, name):
    spec, path = exported[name]
    rep = check_parity(spec, path)  # fresh seed each run, recorded in the report
    assert len(rep["points"]) >= 2 and rep["points"][0]["point"] != rep["points"][1]["point"]
    assert rep["passed"], json.dumps(rep, indent=1)
    for p in rep["points"]:
        assert set(p["outputs"]) == set(spec.output_names)
        for o in p["outputs"].values():
            assert o["max_abs"] < 1e-4 and o["max_rel"] < 1e-4 and o["ref_max"] > 0  # a non-trivial output


def test_graph_is_checked_and_named(exported):
    spec, path = exported["unet"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == spec.input_names
    assert [o.name for o in model.graph.output] == spec.output_names
    assert model.opset_import[0].version == 17
    ops = {n.op_type for n in model.graph.node}
    assert "MatMul" in ops and "Softmax" in ops and "Attention" not in ops  # SDPA lowered
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["B", "V", "F", 4, "h", "w"]
    inferred = check_onnx(spec, path)
    assert inferred["out"][3] == 4


def test_parity_detects_a_wrong_graph(exported, micro_model):
    """A graph of other weights fails the check (the comparison can fail)."""
    spec, path = exported["vae_decoder"]
    other = stage2_specs(micro_model)["vae_decoder"]
    with torch.no_grad():
        saved = other.module.autoencoder.decoder.conv_out.bias.clone()
        other.module.autoencoder.decoder.conv_out.bias.add_(0.01)
    try:
        rep = check_parity(other, path, seed=0)
    finally:
        with torch.no_grad():
            other.module.autoencoder.decoder.conv_out.bias.copy_(saved)
    assert not rep["passed"]
    assert rep["points"][0]["outputs"]["images"]["max_abs"] == pytest.approx(0.01, rel=1e-3)


def test_opset_20_and_forced_external_data(micro_model, tmp_path):
    spec = stage2_specs(micro_model)["vae_decoder"]
    path = export_onnx(spec, tmp_path / "dec" / "model.onnx", opset=20, external_data=True)
    data = path.with_name("model.onnx.data")
    assert data.is_file() and data.stat().st_size > 10_000
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert onnx.load(str(path), load_external_data=False).opset_import[0].version == 20
    assert check_parity(spec, path)["passed"]
    with pytest.raises(ValueError, match="opset"):
        export_onnx(spec, tmp_path / "x.onnx", opset=23)


def test_one_file_per_tensor_is_folded(micro_model, tmp_path):
    """What the exporter writes for a > 2 GB graph (one file per tensor) is folded into one .data file."""
    from mvportrait.export.onnx import _fold_external_data

    spec = stage2_specs(micro_model)["flame_encoder"]
    path = export_onnx(spec, tmp_path / "model.onnx", check=False)
    m = onnx.load(str(path))
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(tmp_path.iterdir())) > 3
    assert _fold_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    check_onnx(spec, path)
    assert check_parity(spec, path, seed=1)["passed"]


def test_fingerprint_and_key_follow_weights_and_shapes(micro_model):
    spec = stage2_specs(micro_model)["flame_encoder"]
    fp = module_fingerprint(spec.module)
    assert fp == module_fingerprint(spec.module)
    k = onnx_key_fields(spec, fingerprint=fp)
    assert k["opset"] == 17 and k["versions"]["torch"] == torch.__version__
    assert onnx_key_fields(spec.with_dims(N=(1, 1, 2)), fingerprint=fp) != k
    w = spec.module.conv_in.weight
    with torch.no_grad():
        w[0, 0, 0, 0] += 1.0
    try:
        assert module_fingerprint(spec.module) != fp
    finally:
        with torch.no_grad():
            w[0, 0, 0, 0] -= 1.0
