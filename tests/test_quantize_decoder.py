"""``quantize`` for exported Lily decoders (issue 14): FP16, INT8 Q/DQ and INT4 weight-only, judged by generation.

Tiny Llama and Qwen2 configs with Lily on q/v/down (prompt routing), exported with their KV cache
and routing state (and Llama without a cache). Prompts are real SST-2 reviews with their label
as the response, so perplexity is of real text.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import data_file
from lily_deploy.cli import cli
from lily_deploy.runtime.onnx_io import metadata

LOOSE = ["--min-token-agreement", "0", "--max-ppl-increase", "100"]  # random tiny models: measured, not judged
SMALL = ["--val-size", "8", "--new-tokens", "8"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    from lily_deploy.core.data import read_text_table

    table = read_text_table(data_file("sst2", "dev.tsv"), limit=200)
    rows = [(t, l) for t, l in zip(table.texts, table.labels) if 3 <= len(t.split()) <= 14][:32]
    out = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    out.write_text("".join(json.dumps({"prompt": f"Review: {t}\nSentiment:",
                                       "response": " positive" if str(l) in ("1", "positive") else " negative"}) + "\n"
                           for t, l in rows))
    return out


def _export(adapter, out: Path, cache: bool = True) -> Path:
    from lily_deploy.onnx_export import export_onnx

    result = export_onnx(source=adapter, output=out, cache=cache)
    assert result.passed and out.is_file()
    return out


@pytest.fixture(scope="module")
def llama_onnx(llama_adapter, tmp_path_factory) -> Path:
    return _export(llama_adapter, tmp_path_factory.mktemp("llama_onnx") / "llama.onnx")


@pytest.fixture(scope="module")
def qwen2_onnx(qwen2_adapter, tmp_path_factory) -> Path:
    return _export(qwen2_adapter, tmp_path_factory.mktemp("qwen2_onnx") / "qwen2.onnx")


def _quantize(src, out, *args):
    result = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result


def _info(path: Path) -> dict:
    return json.loads(metadata(onnx.load(str(path), load_external_data=False))["lily_deploy.quantization"])


@pytest.mark.parametrize("graph", ["llama_onnx", "qwen2_onnx"])
def test_fp16_decoder_generates_what_fp32_generates(graph, prompts, request, tmp_path):
    src = request.getfixturevalue(graph)
    out = tmp_path / "fp16.onnx"
    result = _quantize(src, out, "--fp16", "--val", prompts, "--val-size", 16, "--new-tokens", 16,
                       "--min-token-agreement", 99, "--max-ppl-increase", 1)
    assert result.exit_code == 0 and out.is_file(), result.output
    val = _info(out)["validation"]
    assert val["token_agreement"] >= 0.99 and val["prompts"] == 16 and val["passed"]
    assert abs(val["ppl_increase_percent"]) < 1
    model = onnx.load(str(out))
    assert any(f.name == "HPMixState" for f in model.functions)  # routing state: a function with its body, fp32
    io = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert all(t == onnx.TensorProto.FLOAT for n, t in io.items() if "past" in n or "present" in n or n == "logits")
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    info = _info(out)
    assert info["routing_precision"].startswith("fp32") and info["format"] == "casts"
    assert "PASSED" in result.output and "greedy tokens" in result.output


def test_int8_decoder_is_tensorrt_qdq_from_calibration_prompts(llama_onnx, prompts, tmp_path):
    out = tmp_path / "int8.onnx"
    result = _quantize(llama_onnx, out, "--int8", "--calib", prompts, "--calib-size", 8, *SMALL, *LOOSE)
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    zps = [n.input[2] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
           and len(n.input) > 2]
    assert zps and all(not np.any(onnx.numpy_helper.to_array(inits[z])) for z in zps)  # symmetric: TensorRT's form
    info = _info(out)
    assert info["format"] == "QDQ" and info["calib_prompts"] == 8 and info["int8_matmuls"] > 10
    assert info["kept_fp32"]["attention MatMuls (activation x activation)"] == 4  # 2 layers x (QK^T, PV)
    assert "prefill and decode steps of 8 prompts" in result.output
    assert 0 <= info["validation"]["token_agreement"] <= 1 and info["validation"]["ppl_fp32"] > 1


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_int4_weight_only_per_target(llama_onnx, prompts, tmp_path, target):
    out = tmp_path / f"int4.{target}.onnx"
    result = _quantize(llama_onnx, out, "--int4", "--int4-target", target, "--val", prompts, *SMALL, *LOOSE)
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    if target == "onnxruntime":
        assert "MatMulNBits" in ops and not int4
    else:  # blockwise INT4 DequantizeLinear weights, fp16 activations, nothing onnxruntime-only
        assert "MatMulNBits" not in ops and int4
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {t.name for t in int4}]
        assert dq and all(a.i == 32 for n in dq for a in n.attribute if a.name == "block_size")
        assert not {o.domain for o in model.opset_import} - {"", "ai.onnx", "lily"}
    info = _info(out)
    assert info["block_size"] == 32 and info["target"] == target and info["int4_matmuls"] > 0
    assert info["kept_fp32"]["router MatMuls (input dim = rank, below an int4 block)"] == 6
    # the 30k-word LM head and embedding are most of the file; the embedding (a Gather) stays fp32
    assert out.stat().st_size < 0.65 * llama_onnx.stat().st_size


def test_int4_embedding_too(llama_onnx, prompts, tmp_path):
    out = tmp_path / "int4.emb.onnx"
    result = _quantize(llama_onnx, out, "--int4", "--int4-embedding", "--val", prompts, *SMALL, *LOOSE)
    assert result.exit_code == 0 and "token embedding included" in result.output, result.output
    assert "GatherBlockQuantized" in {n.op_type for n in onnx.load(str(out)).graph.node}
    assert _info(out)["embedding"] == "int4 (GatherBlockQuantized)"
    assert out.stat().st_size < 0.25 * llama_onnx.stat().st_size
    bad = _quantize(llama_onnx, tmp_path / "b.onnx", "--int4", "--int4-embedding", "--int4-target", "tensorrt",
                    "--val", prompts)
    assert bad.exit_code == 2 and "'--int4-embedding'" in bad.output


def test_int4_calibrated_methods_on_the_cpu(llama_onnx, prompts, tmp_path):
    for method in ("hqq", "gptq"):
        out = tmp_path / f"{method}.onnx"
        result = _quantize(llama_onnx, out, "--int4", "--int4-method", method, "--calib", prompts,
                           "--calib-size", 4, *SMALL, *LOOSE)
        assert result.exit_code == 0, result.output
        assert _info(out)["method"] == method and "MatMulNBits" in {n.op_type for n in onnx.load(str(out)).graph.node}


def test_validation_budget_failure_exits_1_and_writes_nothing(llama_onnx, prompts, tmp_path):
    out = tmp_path / "int4.onnx"
    result = _quantize(llama_onnx, out, "--int4", "--val", prompts, *SMALL, "--min-token-agreement", 100)
    assert result.exit_code == 1 and not out.exists()
    assert "validation failed: token agreement" in result.output and "not written" in result.output


def test_no_cache_decoder_and_bad_input(llama_adapter, prompts, tmp_path):
    graph = _export(llama_adapter, tmp_path / "plain.onnx", cache=False)
    out = tmp_path / "plain.fp16.onnx"
    result = _quantize(graph, out, "--fp16", "--val", prompts, *SMALL, "--min-token-agreement", 99)
    assert result.exit_code == 0 and _info(out)["validation"]["token_agreement"] >= 0.99, result.output
    bad = _quantize(graph, tmp_path / "b.onnx", "--int4", "--block-size", 128, "--val", prompts)
    assert bad.exit_code == 1 and "--block-size 128 does not divide the input dimension 32 of MatMul" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    tsv = _quantize(graph, tmp_path / "b.onnx", "--fp16", "--val", data_file("sst2", "dev.tsv"))
    assert tsv.exit_code == 1 and "prompts JSONL of generate" in tsv.output
    none = _quantize(graph, tmp_path / "b.onnx", "--fp16")
    assert none.exit_code == 1 and "--val: a decoder is validated by generation" in none.output
    assert not (tmp_path / "b.onnx").exists()


def test_encoder_int4_is_refused_and_fp16_without_val_uses_generated_inputs(tiny_roberta_adapter, tmp_path):
    from lily_deploy.onnx_export import export_onnx

    graph = tmp_path / "enc.onnx"
    assert export_onnx(source=tiny_roberta_adapter, output=graph).passed
    bad = _quantize(graph, tmp_path / "e4.onnx", "--int4")
    assert bad.exit_code == 1 and "--int4 (weight-only) is for decoders" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "e4.onnx").exists()
    ok = _quantize(graph, tmp_path / "e16.onnx", "--fp16")
    assert ok.exit_code == 0, ok.output
    assert "no --val given: validated on 64 generated inputs (seeded review sentences)" in ok.output


def test_decoder_profiles_need_a_kv_cache(llama_adapter, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed (pip install tensorrt-rtx-cu12)")
    graph = _export(llama_adapter, tmp_path / "plain.onnx", cache=False)
    result = CliRunner().invoke(cli, ["build-trt", str(graph), "--backend", "tensorrt-rtx", "-o", str(tmp_path / "p.plan"),
                                      "--min-shapes", "past_key_values.0.key:1x2x1x8",
                                      "--opt-shapes", "past_key_values.0.key:1x2x4x8",
                                      "--max-shapes", "past_key_values.0.key:1x2x8x8"])
    assert result.exit_code == 2 and "no past_key_values.* inputs" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "p.plan").exists()


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])  # each build takes about 5 s
def test_quantized_decoders_build_with_tensorrt_rtx_for_two_targets(llama_onnx, prompts, tmp_path, precision):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed (pip install tensorrt-rtx-cu12)")
    from lily_deploy.trt_build import build_engine

    graph = tmp_path / f"{precision}.onnx"
    extra = {"fp16": ["--val", prompts], "int8": ["--calib", prompts, "--calib-size", 4],
             "int4": ["--int4-target", "tensorrt", "--val", prompts]}[precision]
    assert _quantize(llama_onnx, graph, f"--{precision}", *extra, *SMALL, *LOOSE).exit_code == 0
    report = build_engine(onnx_path=graph, output=tmp_path / "e.plan", backend="tensorrt-rtx",
                          compute_capabilities=["sm86", "sm89"], progress=False)
    assert (tmp_path / "e.plan").stat().st_size > 1_000_000
    assert len(report["profiles"]) == 2  # prefill and decode
    from lily_deploy.runtime.onnx_io import load_onnx
    from lily_deploy.trt_build import precision_summary

    label = precision_summary(load_onnx(graph))["label"]
    assert label == {"fp16": "fp16", "int8": "int8 (Q/DQ)", "int4": "int4 (Q/DQ)"}[precision]


def test_build_trt_names_the_int4_target_for_a_matmulnbits_graph(llama_onnx, prompts, tmp_path):
    graph = tmp_path / "int4.ort.onnx"
    assert _quantize(llama_onnx, graph, "--int4", "--val", prompts, *SMALL, *LOOSE).exit_code == 0
    result = CliRunner().invoke(cli, ["build-trt", str(graph), "--backend", "tensorrt-rtx", "-o",
                                      str(tmp_path / "p.plan")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "MatMulNBits" in result.output and "--int4-target tensorrt" in result.output
    assert not (tmp_path / "p.plan").exists()
