"""``export --optimize onnxruntime``: fused attention for base and Lily graphs, validated, never for TensorRT.

The tiny RoBERTa (BERT family, biased q/k/v) with and without its Lily adapter on query and
value: the base fuses to Attention, the Lily model to MultiHeadAttention with the adapter term
added to the projection it takes; both keep SkipLayerNormalization and BiasGelu, both match
torch within the export's default 1e-4, and build-trt refuses either in one line.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lily_deploy.cli import cli

ATTENTION = ("Attention", "MultiHeadAttention")


def _export(source, out, *extra):
    result = CliRunner().invoke(cli, ["export", str(source), "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def graphs(tiny_roberta_dir, tiny_roberta_adapter, tmp_path_factory, one_torch_thread):
    """Raw and optimised exports of the base and the Lily model, with the CLI's output of each."""
    out = tmp_path_factory.mktemp("optimize")
    made = {}
    for name, source in (("base", tiny_roberta_dir), ("lily", tiny_roberta_adapter)):
        made[name] = (out / f"{name}.onnx", _export(source, out / f"{name}.onnx", "--no-validate"))  # tested elsewhere
        made[f"{name}.ort"] = (out / f"{name}.ort.onnx",
                               _export(source, out / f"{name}.ort.onnx", "--optimize", "onnxruntime"))
    return made


def _ops(path):
    import onnx

    model = onnx.load(str(path))
    return model, [(n.domain, n.op_type) for n in model.graph.node]


def test_base_graph_fuses_attention_layernorm_and_gelu(graphs):
    path, output = graphs["base.ort"]
    assert "validation: onnxruntime vs torch (PASSED)" in output
    _, ops = _ops(path)
    fused = [op for domain, op in ops if domain == "com.microsoft"]
    assert fused.count("Attention") == 4  # one per layer
    assert fused.count("SkipLayerNormalization") >= 8 and fused.count("BiasGelu") == 4


def test_lily_terms_do_not_block_attention_fusion(graphs):
    path, output = graphs["lily.ort"]
    assert "validation: onnxruntime vs torch (PASSED)" in output
    assert "note: fused for onnxruntime (4 BiasGelu, 4 MultiHeadAttention" in output and "8 Lily terms" in output
    model, ops = _ops(path)
    fused = [op for domain, op in ops if domain == "com.microsoft"]
    assert fused.count("MultiHeadAttention") == 4 and fused.count("BiasGelu") == 4
    meta = {p.key: p.value for p in model.metadata_props}
    info = json.loads(meta["lily_deploy.optimize"])
    assert info["target"] == "onnxruntime" and info["adapter_terms"] == 8  # 4 layers x query, value
    assert info["fused"]["MultiHeadAttention"] == 4
    # every adapter term enters the projection the fused attention takes: P + term -> MultiHeadAttention
    producer = {o: n for n in model.graph.node for o in n.output}
    entries = [producer[i] for n in model.graph.node if n.op_type == "MultiHeadAttention"
               for i in n.input[:3] if i in producer and producer[i].op_type == "Add"]
    assert len(entries) == 8
    assert [o.name for o in model.graph.output] == ["logits"]


@pytest.mark.parametrize("name", ["base", "lily"])
def test_optimised_graph_matches_raw_graph_under_left_and_right_padding(graphs, name):
    from lily_deploy.runtime.ort import ort_session

    raw, fused = (ort_session(graphs[k][0], threads=1) for k in (name, f"{name}.ort"))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 30000, (4, 17)).astype(np.int64)
    for side in ("right", "left"):
        mask = np.ones_like(ids)
        for row, length in enumerate((17, 11, 5, 1)):
            mask[row, length:] = 0 if side == "right" else 1
            if side == "left":
                mask[row, :17 - length] = 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds = {k: v for k, v in feeds.items() if k in {i.name for i in raw.get_inputs()}}
        want, got = raw.run(None, feeds)[0], fused.run(None, feeds)[0]
        assert np.abs(want - got).max() < 1e-4, side


def test_default_export_has_no_onnxruntime_only_ops(graphs):
    for name in ("base", "lily"):
        model, ops = _ops(graphs[name][0])
        assert not [op for domain, op in ops if domain == "com.microsoft"]
        assert "lily_deploy.optimize" not in {p.key for p in model.metadata_props}


@pytest.mark.parametrize("name", ["base.ort", "lily.ort"])
def test_build_trt_refuses_an_onnxruntime_graph_in_one_line(graphs, name, tmp_path):
    path = graphs[name][0]
    result = CliRunner().invoke(cli, ["build-trt", str(path), "-o", str(tmp_path / "m.plan")])
    assert result.exit_code == 1
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "--optimize none" in lines[0] and str(path) in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.plan").exists()


def test_optimize_with_standard_ops_is_a_usage_error(tiny_roberta_adapter, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(tiny_roberta_adapter), "-o", str(tmp_path / "m.onnx"),
                                      "--optimize", "onnxruntime", "--ops", "standard"])
    assert result.exit_code == 2 and "--optimize" in result.output, result.output
    assert not (tmp_path / "m.onnx").exists()


def test_fuser_that_fuses_no_attention_is_refused():
    """A graph without attention (here: a bare MatMul) gains nothing from the fuser: one line, not a file."""
    import onnx
    from onnx import TensorProto, helper

    from lily_deploy.core.errors import LilyDeployError
    from lily_deploy.graph_optimize import optimize_graph

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(LilyDeployError, match="fused no attention"):
        optimize_graph(model, "onnxruntime", "tiny.onnx")
    onnx.checker.check_model(model)


def test_int8_of_a_fused_graph_defaults_to_the_onnxruntime_form(graphs, tmp_path):
    """quantize picks uint8 activations for a graph no TensorRT takes, and it still validates against fp32."""
    import onnx

    path = graphs["lily.ort"][0]
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, input_ids=rng.integers(5, 90, (48, 12)).astype(np.int64),
             token_type_ids=np.zeros((48, 12), np.int64), attention_mask=np.ones((48, 12), np.int64))
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(cli, ["quantize", str(path), "--int8", "--calib", str(calib), "--max-accuracy-drop",
                                      "100", "--no-cache", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "asymmetric uint8 activations" in result.output and "PASSED" in result.output
    model = onnx.load(str(out))
    info = json.loads({p.key: p.value for p in model.metadata_props}["lily_deploy.quantization"])
    assert info["target"] == "onnxruntime" and info["min_sqnr_db"] == 18.0
    zero_points = [i for i in model.graph.initializer if i.name.endswith("_zero_point")]
    assert any(z.data_type == onnx.TensorProto.UINT8 for z in zero_points)
    assert [n for n in model.graph.node if n.op_type in ATTENTION], "the fused attention stays fused"

    refused = CliRunner().invoke(cli, ["quantize", str(path), "--int8", "--int8-target", "tensorrt", "--calib",
                                       str(calib), "--no-cache", "-o", str(tmp_path / "t.onnx")])
    assert refused.exit_code == 1 and "--int8-target tensorrt" in refused.output and str(path) in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "t.onnx").exists()
