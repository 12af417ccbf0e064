"""Export: lily::HPMix nodes with function bodies, onnxruntime against torch for every routing mode,
batch/padding invariance in the ONNX model, determinism, TensorRT-for-RTX parsing, bad input."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from conftest import SENTENCES, build_rtx_engine
from lily_deploy.converters.hpmix import DOMAIN, OP_TYPE
from lily_deploy.cli import cli
from lily_deploy.core.deploy import load_model
from lily_deploy.core.config import ConfigError
from lily_deploy.onnx_export import ExportConfig, export_onnx

ALLOWED_BODY_OPS = {"Softmax", "Shape", "Constant", "Concat", "Reshape", "Unsqueeze", "Mul", "MatMul", "ReduceMean",
                    "ReduceSum", "CastLike", "Max", "Div"}


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(session, batch):
    names = [i.name for i in session.get_inputs()]
    return session.run(["logits"], {n: batch[n].numpy() for n in names})[0]


def _text(model, texts, pad_to=None):
    kwargs = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": True}
    enc = model.tokenizer(list(texts), return_tensors="pt", **kwargs)
    return {k: v for k, v in enc.items() if k in model.input_names}


@pytest.fixture(scope="module")
def minilm_exports(minilm_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    paths = {}
    for routing in ("sample", "batch", "token"):
        result = export_onnx(source=minilm_adapter, output=out / f"{routing}.onnx", routing=routing)
        assert result.passed and result.dynamic_layers == 12
        paths[routing] = out / f"{routing}.onnx"
    return paths


@pytest.mark.parametrize("routing", ["sample", "batch", "token"])
def test_minilm_onnx_matches_torch_every_mode(minilm_adapter, minilm_exports, routing):
    model = load_model(minilm_adapter, mode=routing)
    session = _session(minilm_exports[routing])
    with torch.no_grad():
        for texts, pad_to in [(SENTENCES[:1], None), (SENTENCES[:3], None), (SENTENCES, 64), (SENTENCES * 2, 20)]:
            batch = _text(model, texts, pad_to)
            ref = model.logits(**batch).numpy()
            assert np.abs(_run(session, batch) - ref).max() <= 1e-4


def test_custom_op_structure_and_metadata(minilm_exports):
    m = onnx.load(str(minilm_exports["sample"]))
    onnx.checker.check_model(m, full_check=True)
    nodes = [n for n in m.graph.node if n.domain == DOMAIN]
    assert len(nodes) == 12 and all(n.op_type == OP_TYPE for n in nodes)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["mode"] == b"sample" and attrs["scale"] == pytest.approx(2.0)
    assert len(nodes[0].input) == 4  # h, router logits, HP pool, mask
    assert [(f.domain, f.name) for f in m.functions] == [(DOMAIN, OP_TYPE)]
    body_ops = {n.op_type for n in m.functions[0].node}
    assert body_ops <= ALLOWED_BODY_OPS and "Einsum" not in body_ops
    # the LP and router stay plain MatMuls outside the op
    producers = {o: n for n in m.graph.node for o in n.output}
    assert producers[nodes[0].input[0]].op_type == "MatMul" and producers[nodes[0].input[1]].op_type == "MatMul"
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["lily_deploy.routing"] == "sample" and meta["lily_deploy.version"]
    assert json.loads(meta["lily_deploy.fold"])["dynamic_layers"] == 12
    assert meta["lily_deploy.adapter_sha256"]
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["attention_mask"] == ["batch", "sequence"]
    assert [o.name for o in m.graph.output] == ["logits"]


def test_sample_mode_onnx_is_batch_and_padding_invariant(minilm_adapter, minilm_exports):
    model = load_model(minilm_adapter)
    session = _session(minilm_exports["sample"])
    alone = [_run(session, _text(model, [s]))[0] for s in SENTENCES]
    mixed = _run(session, _text(model, SENTENCES, pad_to=50))
    assert max(np.abs(mixed[i] - a).max() for i, a in enumerate(alone)) <= 1e-5
    batch_session = _session(minilm_exports["batch"])
    alone_b = [_run(batch_session, _text(model, [s]))[0] for s in SENTENCES]
    mixed_b = _run(batch_session, _text(model, SENTENCES, pad_to=50))
    assert max(np.abs(mixed_b[i] - a).max() for i, a in enumerate(alone_b)) > 1e-4


def test_standard_ops_and_deterministic_export(minilm_adapter, minilm_exports, tmp_path):
    a = export_onnx(source=minilm_adapter, output=tmp_path / "a.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == minilm_exports["sample"].read_bytes()
    std = export_onnx(source=minilm_adapter, output=tmp_path / "std.onnx", ops="standard")
    assert a.passed and std.passed
    m = onnx.load(str(tmp_path / "std.onnx"))
    assert not m.functions and not any(n.domain == DOMAIN for n in m.graph.node)
    model = load_model(minilm_adapter)
    batch = _text(model, SENTENCES)
    assert np.abs(_run(_session(tmp_path / "std.onnx"), batch) - _run(_session(tmp_path / "a.onnx"), batch)).max() <= 1e-6


@pytest.mark.parametrize("routing", ["sample", "batch", "token"])
def test_tiny_vit_and_biased_roberta_export(tiny_vit_adapter, tiny_roberta_adapter, tmp_path, routing):
    vit = export_onnx(source=tiny_vit_adapter, output=tmp_path / "vit.onnx", routing=routing)
    assert vit.passed and vit.dynamic_layers == 4
    model = load_model(tiny_vit_adapter, mode=routing)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.logits(pixel_values=x).numpy()
    assert np.abs(_run(_session(tmp_path / "vit.onnx"), {"pixel_values": x}) - ref).max() <= 1e-4
    rob = export_onnx(source=tiny_roberta_adapter, output=tmp_path / "rob.onnx", routing=routing)
    assert rob.passed and rob.dynamic_layers == 8
    model = load_model(tiny_roberta_adapter, mode=routing)
    with torch.no_grad():
        for bs, pad in ((1, None), (4, 30)):
            batch = _text(model, SENTENCES[:bs], pad)
            assert np.abs(_run(_session(tmp_path / "rob.onnx"), batch) - model.logits(**batch).numpy()).max() <= 1e-4


def test_function_body_graph_builds_with_tensorrt_rtx(minilm_exports, tmp_path):
    report = build_rtx_engine(minilm_exports["sample"], tmp_path / "sample.plan")
    assert report["onnx"]["routing"] == "sample"


# ---- bad input ----------------------------------------------------------------------------------

def test_plain_model_exports_saying_so(tmp_path):
    result = CliRunner().invoke(cli, ["export", "minilm", "-o", str(tmp_path / "base.onnx")])
    assert result.exit_code == 0, result.output
    assert "no Lily layers" in result.output and (tmp_path / "base.onnx").exists()


def test_export_bad_input(minilm_adapter, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["export", str(minilm_adapter), "-o", str(tmp_path / "m.onnx"), "--opset", "17"])
    assert r.exit_code == 2 and "'--opset'" in r.output and "17: " in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["export", str(minilm_adapter), "-o", str(tmp_path / "missing" / "m.onnx")])
    assert r.exit_code == 1 and "does not exist" in r.output
    np.savez(tmp_path / "bad.npz", input_ids=np.ones((2, 5), np.int64), attention_mask=np.ones((2, 6), np.int64),
             token_type_ids=np.zeros((2, 5), np.int64))
    r = runner.invoke(cli, ["export", str(minilm_adapter), "-o", str(tmp_path / "m.onnx"), "--inputs",
                            str(tmp_path / "bad.npz")])
    assert r.exit_code == 1 and "attention_mask has shape [2, 6]" in r.output
    assert not (tmp_path / "m.onnx").exists()


def test_validation_failure_keeps_no_file_unless_asked(tiny_roberta_adapter, tmp_path):
    runner = CliRunner()
    out = tmp_path / "m.onnx"
    r = runner.invoke(cli, ["export", str(tiny_roberta_adapter), "-o", str(out), "--atol", "logits:0"])
    assert r.exit_code == 1 and "FAILED" in r.output and "not written" in r.output and not out.exists()
    assert not list(tmp_path.iterdir())  # no temporary leftovers either
    r = runner.invoke(cli, ["export", str(tiny_roberta_adapter), "-o", str(out), "--atol", "logits:0",
                            "--keep-on-failure"])
    assert r.exit_code == 1 and out.exists()


def test_unsupported_layer_type_is_named(minilm_adapter, tmp_path):
    from lily_deploy.core.deploy import save_deploy

    save_deploy(load_model(minilm_adapter), tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "deploy_config.json"
    cfg = json.loads(cfg_path.read_text())
    first = next(iter(cfg["layers"]))
    cfg["layers"]["bert.encoder.layer.0.attention.output.LayerNorm"] = cfg["layers"].pop(first)
    cfg_path.write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1 and "LayerNorm is not a Linear" in r.output


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("target", ["weights", "data", "inputs"])
def test_export_never_writes_over_an_input(minilm_adapter, tmp_path, target):
    data = tmp_path / "val.tsv"
    data.write_text("sentence\tlabel\ngood film\t1\n")
    inputs = tmp_path / "in.npz"
    np.savez(inputs, input_ids=np.ones((1, 4), np.int64), attention_mask=np.ones((1, 4), np.int64))
    output = {"weights": minilm_adapter / "adapter_model.safetensors", "data": data, "inputs": inputs}[target]
    extra = {"weights": [], "data": ["--data", str(data)], "inputs": ["--inputs", str(inputs)]}[target]
    before, data_before, inputs_before = _files(minilm_adapter), data.read_bytes(), inputs.read_bytes()
    r = CliRunner().invoke(cli, ["export", str(minilm_adapter), "-o", str(output), *extra])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "input" in r.output and str(output) in r.output
    assert _files(minilm_adapter) == before and data.read_bytes() == data_before
    assert inputs.read_bytes() == inputs_before


@pytest.mark.parametrize("flag, value, field", [
    ("--opset", "17", "opset"), ("--dynamic", "batch,width", "dynamic"), ("--atol", "nan", "atol"),
    ("--atol", "logits:-1", "atol"),
])
def test_export_config_errors_name_the_flag_and_the_field(minilm_adapter, tmp_path, flag, value, field):
    r = CliRunner().invoke(cli, ["export", str(minilm_adapter), "-o", str(tmp_path / "m.onnx"), flag, value])
    assert r.exit_code == 2 and flag in r.output and "Traceback" not in r.output, r.output
    typed = {"opset": int, "dynamic": str, "atol": lambda v: {"logits": float(v.rpartition(":")[2])}}[field](value)
    with pytest.raises(ConfigError) as exc:
        ExportConfig(source=minilm_adapter, output=tmp_path / "m.onnx", **{field: typed})
    assert exc.value.field == field and str(exc.value).startswith(f"{field}: ")
    assert not (tmp_path / "m.onnx").exists()


def test_export_config_fields_and_task_check(minilm_adapter, tmp_path):
    config = ExportConfig(source=minilm_adapter, output=tmp_path / "m.onnx", dynamic="batch")
    assert config.dynamic == ("batch",) and config.opset == 20 and config.validation and config.atol == {}
    for bad in ({"routing": "static"}, {"ops": "fused"}, {"task": "detection"}, {"opset": 18.5}):
        with pytest.raises(ConfigError) as exc:
            config.replace(**bad)
        assert exc.value.field == next(iter(bad))
    with pytest.raises(TypeError):
        export_onnx(config, validate=False)  # the field is `validation`
    r = CliRunner().invoke(cli, ["export", str(minilm_adapter), "-o", str(tmp_path / "m.onnx"), "--task", "image-cls"])
    assert r.exit_code == 2 and "'--task'" in r.output and "seq-cls" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m.onnx").exists()
