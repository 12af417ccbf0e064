"""``build-trt``: real TensorRT-for-RTX builds on the CPU, the build report, bad input, the runner.

Engines are built ahead of time with TensorRT for RTX (no GPU needed); running them needs a
GPU, so runner and plugin runtime tests are marked ``gpu`` and skip with the reason here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lily_deploy import trt_build as build_trt
from lily_deploy.trt_build import (BuildConfig, build_engine, load_onnx, onnx_io, parse_shape_spec, parse_size,
                                   precision_summary, report_path, resolve_profiles)
from lily_deploy.cli import cli
from lily_deploy.core.config import ConfigError
from lily_deploy.core.errors import LilyDeployError
from lily_deploy.runtime.tensorrt import TrtRunner, check_compatible, pick_profile

from conftest import SENTENCES

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT for RTX is not installed (pip install tensorrt-rtx-cu12)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


needs_gpu = pytest.mark.skipif(not _cuda(), reason="no CUDA GPU here: running an engine needs one")
needs_any_trt = pytest.mark.skipif(not (HAS_RTX or HAS_TRT), reason="neither TensorRT nor TensorRT for RTX installed")


# ---------------------------------------------------------------------------------------
# fixtures: graphs to build
# ---------------------------------------------------------------------------------------

def _export_onnx():
    try:
        from lily_deploy.onnx_export import export_onnx
    except ImportError as exc:
        pytest.skip(f"lily_deploy.onnx_export is not available yet ({exc})")
    return export_onnx


@pytest.fixture(scope="module")
def lily_onnx(minilm_adapter, tmp_path_factory) -> Path:
    """MiniLM+Lily, fp32, lily::HPMix custom ops with function bodies, sample routing."""
    out = tmp_path_factory.mktemp("trt_lily") / "lily.onnx"
    result = _export_onnx()(source=minilm_adapter, output=out, routing="sample", ops="custom", validation=False)
    assert result.dynamic_layers > 0
    return out


@pytest.fixture(scope="module")
def folded_onnx(minilm_adapter, tmp_path_factory) -> Path:
    """The same model with every Lily layer folded into the base weights (no lily::HPMix left)."""
    try:
        from lily_deploy.folding import fold
    except ImportError as exc:
        pytest.skip(f"lily_deploy.folding is not available yet ({exc})")
    d = tmp_path_factory.mktemp("trt_folded")
    fold(source=minilm_adapter, output=d / "ckpt", strategy="all", random_inputs=True, size=8, batch_size=8,
         progress=False)
    out = d / "folded.onnx"
    _export_onnx()(source=d / "ckpt", output=out, validation=False)
    return out


def _tokens(n=4, length=16):
    from lily_deploy.core.models import minilm_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    texts = (SENTENCES * n)[:n]
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


def _feeds_for(onnx_path, n=4, length=16):
    names = [t.name for t in onnx_io(load_onnx(onnx_path))[0]]
    tokens = _tokens(n, length)
    return {k: tokens[k] for k in names}


@pytest.fixture(scope="module")
def int8_onnx(lily_onnx, tmp_path_factory) -> Path:
    """INT8 Q/DQ made here with onnxruntime (QDQ, symmetric, per-channel, QuantizeBias False: facts.md)."""
    import onnx
    from onnx.inliner import inline_local_functions
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    d = tmp_path_factory.mktemp("trt_int8")
    inlined = d / "inlined.onnx"
    onnx.save(inline_local_functions(onnx.load(str(lily_onnx))), str(inlined))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([_feeds_for(lily_onnx, 2, 16), _feeds_for(lily_onnx, 4, 24)])

        def get_next(self):
            return next(self.batches, None)

    out = d / "int8.onnx"
    quantize_static(str(inlined), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    return out


@pytest.fixture(scope="module")
def fp16_onnx(lily_onnx, tmp_path_factory) -> Path:
    """FP16 weights and activations with fp32 I/O (onnxconverter_common, as in facts.md).

    On the inlined graph its shape-inference pass names two Casts alike (``_input_cast_0``):
    ``disable_shape_infer=True`` avoids that.
    """
    import onnx
    from onnx.inliner import inline_local_functions
    from onnxconverter_common.float16 import convert_float_to_float16

    out = tmp_path_factory.mktemp("trt_fp16") / "fp16.onnx"
    model = inline_local_functions(onnx.load(str(lily_onnx)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated": expected for fp16
        onnx.save(convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True), str(out))
    return out


def _function_graph(path: Path, bad_inner: bool = False, with_body: bool = True) -> Path:
    """A tiny graph: MatMul then a ``lily::HPMix`` node whose FunctionProto body the parser must inline."""
    import onnx
    from onnx import TensorProto, helper

    inner = [helper.make_node("Constant", [], ["two"], value=helper.make_tensor("v", TensorProto.FLOAT, [], [2.0])),
             helper.make_node("Mul", ["h", "two"], ["y0" if bad_inner else "y"], name="inner_mul")]
    if bad_inner:
        inner.append(helper.make_node("StringNormalizer", ["y0"], ["y"], name="bad_inner"))
    fn = helper.make_function("lily", "HPMix", ["h"], ["y"], inner, opset_imports=[helper.make_opsetid("", 17)],
                              attributes=["scale"])
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("HPMix", ["h"], ["y"], domain="lily", name="layer0.hpmix", scale=0.5)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [onnx.numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("lily", 1)],
                              functions=[fn] if with_body else [])
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------------------
# checks shared by the build tests
# ---------------------------------------------------------------------------------------

def assert_report_matches_onnx(report: dict, onnx_path: Path, targets=None, profiles=None):
    """The report's I/O and profiles agree with the ONNX (names, dtypes, fixed dims, dynamic axes)."""
    inputs, outputs = onnx_io(load_onnx(onnx_path))
    assert [t["name"] for t in report["inputs"]] == [t.name for t in inputs]
    assert [t["name"] for t in report["outputs"]] == [t.name for t in outputs]
    for got, want in zip(report["inputs"] + report["outputs"], inputs + outputs):
        assert got["dtype"] == want.dtype, (got, want)
        assert got["onnx_shape"] == want.dims
        assert len(got["shape"]) == len(want.dims)
        for d, w in zip(got["shape"], want.dims):
            assert d == (w if isinstance(w, int) else -1)
    assert report["profiles"], "no profile recorded"
    for prof in report["profiles"]:
        assert set(prof) == {t.name for t in inputs}
        for t in inputs:
            s = prof[t.name]
            assert len(s["min"]) == len(s["opt"]) == len(s["max"]) == len(t.dims)
            for axis, w in enumerate(t.dims):
                assert s["min"][axis] <= s["opt"][axis] <= s["max"][axis]
                if isinstance(w, int):
                    assert s["min"][axis] == s["max"][axis] == w
    if profiles is not None:
        assert report["profiles"] == profiles
    if targets is not None:
        assert report["target"]["compute_capabilities"] == targets
    engine = Path(report["engine"]["path"])
    assert engine.is_file() and engine.stat().st_size == report["engine"]["bytes"] > 0
    assert json.loads(report_path(engine).read_text()) == report
    assert not [p for p in engine.parent.iterdir() if p.name.endswith(".partial")]


def _no_partials(folder: Path):
    return [p.name for p in folder.iterdir() if ".partial" in p.name]


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False, env={"TQDM_DISABLE": "1"})
    return result


def _assert_user_error(result, *needles, exit_code=1):
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in result.output, (n, result.output)


def _assert_usage_error(result, flag, *needles):
    """A bad flag value: exit 2, the flag named by click's usage message."""
    _assert_user_error(result, f"Invalid value for '{flag}'", *needles, exit_code=2)


# ---------------------------------------------------------------------------------------
# pure parts: flags, profiles, precision summary (no TensorRT needed)
# ---------------------------------------------------------------------------------------

def test_parse_size_units():
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5G") == int(1.5 * (1 << 30))
    assert parse_size("1GB") == 10 ** 9
    assert parse_size("4096") == 4096
    for bad in ("2 parsecs", "", "-1GiB", "0"):
        with pytest.raises(ConfigError, match="workspace") as caught:
            parse_size(bad)
        assert caught.value.field == "workspace" and isinstance(caught.value, LilyDeployError)


@pytest.mark.parametrize("fields, field", [
    (dict(workspace="1KiB"), "workspace"),
    (dict(workspace=(1 << 20) - 1), "workspace"),
    (dict(workspace="lots"), "workspace"),
    (dict(workspace=0), "workspace"),
    (dict(workspace=float("nan")), "workspace"),
    (dict(backend="cuda"), "backend"),
    (dict(shapes=["x:1x"]), "shapes"),
    (dict(opt_shapes=["x:0x8"]), "opt_shapes"),
    (dict(shapes=["x:1x8"], max_shapes=["x:1x8"]), "shapes"),
    (dict(min_shapes=["x:1x8"], max_shapes=["x:1x8", "x:2x8"]), "min_shapes"),
    (dict(compute_capabilities=["eighty-nine"]), "compute_capabilities"),
    (dict(onnx_path=""), "onnx_path"),
])
def test_build_config_names_the_field(fields, field):
    with pytest.raises(ConfigError) as caught:
        BuildConfig(**{"onnx_path": "m.onnx", **fields})
    assert caught.value.field == field and str(caught.value).startswith(f"{field}: ")
    assert "--" not in str(caught.value)  # field names, not flags: the CLI names its flag


def test_build_config_defaults_and_normal_form(tmp_path):
    config = BuildConfig(onnx_path=tmp_path / "m.onnx", workspace="2GiB", compute_capabilities=["sm89"],
                         shapes="x:1x8")
    assert config.workspace == 2 << 30 and config.compute_capabilities == ("sm89",) and config.shapes == ("x:1x8",)
    assert config.engine_path == tmp_path / "m.plan" and config.backend == "auto" and config.progress
    assert config.replace(output=tmp_path / "e.plan").engine_path == tmp_path / "e.plan"
    assert BuildConfig.resolve(config, workspace=4 << 20).workspace == 4 << 20
    with pytest.raises(TypeError, match="no field 'flavour'"):
        build_engine(onnx_path="m.onnx", flavour="fast")


def test_values_that_do_not_fit_the_model_name_their_field(tmp_path):
    """Found once the ONNX is read, still a ConfigError naming the field (the CLI: exit 2, the flag)."""
    onnx_path = _function_graph(tmp_path / "fn.onnx")
    with pytest.raises(ConfigError, match="has no input 'y'") as caught:
        build_engine(onnx_path=onnx_path, output=tmp_path / "x.plan", shapes=["y:1x8"])
    assert caught.value.field == "shapes"
    with pytest.raises(ConfigError, match="need min <= opt <= max") as caught:
        build_engine(BuildConfig(onnx_path=onnx_path, max_shapes=["x:4x8"]), opt_shapes=["x:8x8"])
    assert caught.value.field == "opt_shapes"
    assert not list(tmp_path.glob("*.plan")) and not _no_partials(tmp_path)


def test_parse_shape_spec_trtexec_style():
    assert parse_shape_spec("input_ids:1x128,attention_mask:1x128", "--shapes") == {
        "input_ids": (1, 128), "attention_mask": (1, 128)}
    assert parse_shape_spec("ns:x:2x3", "--shapes") == {"ns:x": (2, 3)}  # names may hold ':'
    for bad in ("input_ids", "input_ids:1x", "input_ids:axb", ":1x2", "input_ids:0x4", "a:1,a:2"):
        with pytest.raises(LilyDeployError, match="--shapes"):
            parse_shape_spec(bad, "--shapes")


def test_default_profiles_from_dynamic_axes(tmp_path):
    inputs, _ = onnx_io(load_onnx(_function_graph(tmp_path / "f.onnx")))
    (p,) = resolve_profiles(inputs)
    assert p.shapes == {"x": ((1, 8), (16, 8), (32, 8))}  # batch 1..32, opt the middle; 8 is fixed


def test_profiles_share_named_dims_and_several_profiles():
    from lily_deploy.trt_build import TensorSpec

    inputs = [TensorSpec("input_ids", ["batch", "sequence"], "int64"),
              TensorSpec("attention_mask", ["batch", "sequence"], "int64")]
    (fixed,) = resolve_profiles(inputs, shapes=["input_ids:1x128"])
    assert fixed.shapes["attention_mask"] == ((1, 128),) * 3  # took batch/sequence from input_ids
    two = resolve_profiles(inputs, min_shapes=["input_ids:1x1", "input_ids:8x64"],
                           max_shapes=["input_ids:4x64", "input_ids:32x512"])
    assert len(two) == 2
    assert two[0].shapes["attention_mask"] == ((1, 1), (2, 32), (4, 64))
    assert two[1].shapes["input_ids"] == ((8, 64), (20, 288), (32, 512))
    (only_max,) = resolve_profiles(inputs, max_shapes=["input_ids:8x128"])
    assert only_max.shapes["input_ids"] == ((1, 1), (4, 64), (8, 128))


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_shapes=["input_ids:4x128"], opt_shapes=["input_ids:2x128"]), "need min <= opt <= max"),
    (dict(min_shapes=["input_ids:1x1"], max_shapes=["input_ids:1x1", "input_ids:2x2"]), "once per profile"),
    (dict(shapes=["input_ids:1x8"], min_shapes=["input_ids:1x1"]), "do not mix"),
    (dict(shapes=["token_ids:1x8"]), "has no input 'token_ids'"),
    (dict(shapes=["input_ids:1x8x3"]), "has 2 dims"),
    (dict(shapes=["input_ids:1x8,attention_mask:1x9"]), "different sizes"),
])
def test_profile_inconsistencies_are_user_errors(kwargs, message):
    from lily_deploy.trt_build import TensorSpec

    inputs = [TensorSpec("input_ids", ["batch", "sequence"], "int64"),
              TensorSpec("attention_mask", ["batch", "sequence"], "int64")]
    with pytest.raises(LilyDeployError, match=message):
        resolve_profiles(inputs, **kwargs)


def test_fixed_dim_and_unknown_dynamic_axis():
    from lily_deploy.trt_build import TensorSpec

    pix = [TensorSpec("pixel_values", ["batch", 3, 224, 224], "float32")]
    with pytest.raises(LilyDeployError, match="fixed at 3"):
        resolve_profiles(pix, shapes=["pixel_values:1x4x224x224"])
    odd = [TensorSpec("x", ["batch", "height"], "float32")]
    with pytest.raises(LilyDeployError, match="no default range"):
        resolve_profiles(odd)
    (p,) = resolve_profiles(odd, min_shapes=["x:1x8"], max_shapes=["x:4x16"])
    assert p.shapes["x"] == ((1, 8), (2, 12), (4, 16))


def test_precision_summary_counts(lily_onnx, int8_onnx, fp16_onnx):
    fp32 = precision_summary(load_onnx(lily_onnx))
    assert fp32["label"] == "fp32" and fp32["quantize_linear"] == 0 and fp32["fp16_casts"] == 0
    assert fp32["custom_ops"]["lily::HPMix"] > 0 and fp32["local_functions"] == ["lily::HPMix"]
    assert "float32" in fp32["initializers"]
    int8 = precision_summary(load_onnx(int8_onnx))
    assert int8["label"] == "int8 (Q/DQ)" and int8["quantize_linear"] > 0 and int8["dequantize_linear"] > 0
    assert int8["initializers"]["int8"]["count"] > 0
    fp16 = precision_summary(load_onnx(fp16_onnx))
    assert fp16["label"] == "fp16" and fp16["initializers"]["float16"]["count"] > 0


@needs_rtx
def test_rtx_targets_exclude_hopper():
    """Seen on an H200: TensorRT-RTX 1.7 builds for 'current' there, but the engine cannot run (sm90)."""
    from lily_deploy.runtime.tensorrt import load_backend, rtx_supports, rtx_targets

    be = load_backend("tensorrt-rtx")
    assert "sm89" in rtx_targets(be) and rtx_supports(be, "SM89")
    assert not rtx_supports(be, "sm90")


def test_check_compatible_names_both_sides():
    report = {"backend": {"name": "tensorrt-rtx", "version": "1.7.1.116"},
              "target": {"compute_capabilities": ["sm89", "sm120"]}}
    check_compatible(report, "tensorrt-rtx", "1.7.1.116", "sm120")  # fits
    with pytest.raises(LilyDeployError, match=r"built for sm89, sm120; NVIDIA H200 is sm90"):
        check_compatible(report, "tensorrt-rtx", "1.7.1.116", "sm90", "NVIDIA H200")
    with pytest.raises(LilyDeployError, match=r"built with TensorRT-RTX 1.7.1.116, this machine has 1.8.0"):
        check_compatible(report, "tensorrt-rtx", "1.8.0", "sm89")
    with pytest.raises(LilyDeployError, match="--backend tensorrt-rtx"):
        check_compatible(report, "tensorrt", "10.13", "sm89")


def test_pick_profile_and_shape_outside_every_profile():
    profiles = [{"input_ids": ((1, 1), (2, 64), (4, 128))}, {"input_ids": ((5, 1), (16, 256), (32, 512))}]
    assert pick_profile(profiles, {"input_ids": (2, 100)}) == 0
    assert pick_profile(profiles, {"input_ids": (8, 300)}) == 1
    with pytest.raises(LilyDeployError, match=r"input_ids 64x128 fit no optimization profile.*profile 1: "
                                              r"input_ids 5x1\.\.32x512"):
        pick_profile(profiles, {"input_ids": (64, 128)})


@pytest.mark.skipif(_cuda(), reason="this machine has a GPU: the no-GPU message does not apply")
@needs_any_trt
def test_runner_without_gpu_says_so(tmp_path):
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"vtrt" + b"\0" * 60)  # an engine's header (random bytes are refused before this)
    with pytest.raises(LilyDeployError, match="needs a CUDA GPU"):
        TrtRunner(engine)


# ---------------------------------------------------------------------------------------
# real builds with TensorRT for RTX (CPU, ahead of time)
# ---------------------------------------------------------------------------------------

@pytest.mark.trt
@needs_rtx
def test_build_lily_fp32_two_compute_capabilities(lily_onnx, tmp_path):
    engine = tmp_path / "lily.plan"
    result = _run(["build-trt", str(lily_onnx), "-o", str(engine), "--backend", "tensorrt-rtx",
                   "--compute-capability", "sm89", "--compute-capability", "sm120"])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path(engine).read_text())
    assert_report_matches_onnx(report, lily_onnx, targets=["sm89", "sm120"])
    import tensorrt_rtx

    assert report["backend"] == {"name": "tensorrt-rtx", "module": "tensorrt_rtx",
                                 "version": tensorrt_rtx.__version__, "onnx_parser": report["backend"]["onnx_parser"]}
    assert report["route"] == "function-inlining" and report["strongly_typed"]
    assert report["precision"]["label"] == "fp32" and report["precision"]["custom_ops"]["lily::HPMix"] == 12
    assert report["onnx"]["routing"] == "sample"
    p = report["profiles"][0]["input_ids"]
    assert p == {"min": [1, 1], "opt": [16, 256], "max": [32, 512]}
    assert report["build_seconds"] > 0 and report["layers"] is None and "GPU" in report["layers_note"]
    # the printed table carries the same facts
    for needle in ("TensorRT-RTX", "sm89, sm120", "input_ids", "min 1x1  opt 16x256  max 32x512", "fp32"):
        assert needle in result.output


@pytest.mark.trt
@needs_rtx
def test_build_api_several_profiles_sm80(lily_onnx, tmp_path):
    engine = tmp_path / "two.plan"
    report = build_engine(onnx_path=lily_onnx, output=engine, backend="tensorrt-rtx",
                          compute_capabilities=["sm80"],
                          min_shapes=["input_ids:1x1", "input_ids:8x64"], opt_shapes=["input_ids:1x64", "input_ids:16x128"],
                          max_shapes=["input_ids:4x128", "input_ids:32x256"], progress=False).data
    assert_report_matches_onnx(report, lily_onnx, targets=["sm80"])
    assert len(report["profiles"]) == 2
    assert report["profiles"][1]["attention_mask"] == {"min": [8, 64], "opt": [16, 128], "max": [32, 256]}


@pytest.mark.trt
@needs_rtx
def test_build_folded_graph(folded_onnx, tmp_path):
    engine = tmp_path / "folded.plan"
    report = build_engine(onnx_path=folded_onnx, output=engine, backend="tensorrt-rtx",
                          compute_capabilities=["sm86", "sm89"], shapes=["input_ids:1x128"], progress=False).data
    assert_report_matches_onnx(report, folded_onnx, targets=["sm86", "sm89"])
    assert report["precision"]["custom_ops"] == {}  # folded: no lily::HPMix left
    assert all(s["min"] == s["max"] == [1, 128] for s in report["profiles"][0].values())


@pytest.mark.trt
@needs_rtx
def test_build_int8_qdq_graph(int8_onnx, tmp_path):
    engine = tmp_path / "int8.plan"
    report = build_engine(onnx_path=int8_onnx, output=engine, backend="tensorrt-rtx",
                          compute_capabilities=["sm89"], max_shapes=["input_ids:8x128"], progress=False).data
    assert_report_matches_onnx(report, int8_onnx, targets=["sm89"])
    assert report["precision"]["label"] == "int8 (Q/DQ)" and report["precision"]["dequantize_linear"] > 0


@pytest.mark.trt
@needs_rtx
def test_build_fp16_graph(fp16_onnx, tmp_path):
    engine = tmp_path / "fp16.plan"
    report = build_engine(onnx_path=fp16_onnx, output=engine, backend="tensorrt-rtx",
                          compute_capabilities=["sm75"], max_shapes=["input_ids:8x128"], progress=False).data
    assert_report_matches_onnx(report, fp16_onnx, targets=["sm75"])
    assert report["precision"]["label"] == "fp16"


def _project_quantize(src: Path, out: Path, precision: str) -> Path:
    """FP16/INT8 graphs from ``lily-deploy quantize`` (issue 5), once it exists."""
    from conftest import data_file

    if importlib.util.find_spec("lily_deploy.commands.quantize") is None:
        pytest.skip("lily-deploy quantize (lily_deploy/commands/quantize.py) is not written yet")
    calib = data_file("sst2", "dev.tsv")
    # small calibration/validation: the graph's accuracy is test_quantize's business, its build is ours
    result = _run(["quantize", str(src), f"--{precision}", "--calib", str(calib), "--calib-size", "16",
                   "--val-size", "16", "--max-length", "32", "--max-accuracy-drop", "100", "--no-cache",
                   "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.trt
@needs_rtx
@pytest.mark.parametrize("precision, label", [("fp16", "fp16"), ("int8", "int8 (Q/DQ)")])
def test_build_project_quantized_graphs(lily_onnx, tmp_path, precision, label):
    graph = _project_quantize(lily_onnx, tmp_path / f"model.{precision}.onnx", precision)
    engine = tmp_path / f"{precision}.plan"
    report = build_engine(onnx_path=graph, output=engine, backend="tensorrt-rtx",
                          compute_capabilities=["sm89", "sm120"], max_shapes=["input_ids:8x128"], progress=False).data
    assert_report_matches_onnx(report, graph, targets=["sm89", "sm120"])
    assert report["precision"]["label"] == label


@pytest.mark.trt
@needs_rtx
def test_build_on_a_gpu_that_is_no_rtx_target(tmp_path, monkeypatch):
    """As on an H200 (sm90): the default target is sm89, with a note; 'current' is a usage error."""
    monkeypatch.setattr(build_trt, "_gpu_info", lambda: {"name": "NVIDIA H200", "compute_capability": "sm90"})
    onnx_path = _function_graph(tmp_path / "fn.onnx")
    result = _run(["build-trt", str(onnx_path), "-o", str(tmp_path / "c.plan"), "--backend", "tensorrt-rtx",
                   "--compute-capability", "current"])
    _assert_usage_error(result, "--compute-capability", "(NVIDIA H200, sm90) is not a TensorRT-RTX", "cannot run here")
    report = build_engine(onnx_path=onnx_path, output=tmp_path / "h.plan", backend="tensorrt-rtx",
                          progress=False).data
    assert report["target"] == {"compute_capabilities": ["sm89"], "ahead_of_time": False,
                                "build_gpu": {"name": "NVIDIA H200", "compute_capability": "sm90"}}
    assert any("this GPU (NVIDIA H200, sm90) is not a TensorRT-RTX" in n for n in report["notes"])
    assert report["layers"] is None and report["layers_note"] == "engine targets sm89, this GPU is sm90"


@pytest.mark.trt
@needs_rtx
def test_timing_cache_not_a_cache_is_refused_and_a_stale_one_noted(tmp_path):
    """A file that is no timing cache would be replaced by one after the build: refused, left as it was."""
    onnx_path = _function_graph(tmp_path / "fn.onnx")
    junk = tmp_path / "junk.cache"
    junk.write_bytes(b"not a timing cache " * 8)
    engine = tmp_path / "fn.plan"
    result = _run(["build-trt", str(onnx_path), "-o", str(engine), "--backend", "tensorrt-rtx",
                   "--timing-cache", str(junk)])
    _assert_user_error(result, f"--timing-cache {junk}: not a timing cache", "delete it")
    assert junk.read_bytes() == b"not a timing cache " * 8
    assert not engine.exists() and not report_path(engine).exists() and not _no_partials(tmp_path)
    # one that starts like a cache but is damaged: built from a fresh cache, and the report says why
    cache = tmp_path / "timing.cache"
    build_engine(onnx_path=onnx_path, output=engine, backend="tensorrt-rtx", timing_cache=cache, progress=False)
    cache.write_bytes(cache.read_bytes()[:-8])
    report = build_engine(onnx_path=onnx_path, output=engine, backend="tensorrt-rtx", timing_cache=cache,
                          progress=False).data
    assert report["timing_cache"]["note"] and report["timing_cache"]["saved_bytes"] == cache.stat().st_size


@pytest.mark.trt
@needs_rtx
def test_outputs_are_readable_by_group_and_other(tmp_path):
    """Under umask 022 the engine, its report and the timing cache are 0644, like any file (not mkstemp's 0600)."""
    onnx_path = _function_graph(tmp_path / "fn.onnx")
    engine, cache = tmp_path / "perm.plan", tmp_path / "timing.cache"
    old = os.umask(0o022)
    try:
        build_engine(BuildConfig(onnx_path=onnx_path, backend="tensorrt-rtx", progress=False), output=engine,
                     timing_cache=cache)
    finally:
        os.umask(old)
    for path in (engine, report_path(engine), cache):
        assert path.stat().st_mode & 0o044 == 0o044, (path, oct(path.stat().st_mode))


@pytest.mark.trt
@needs_rtx
def test_parser_inlines_local_function_and_timing_cache_roundtrip(tmp_path):
    onnx_path = _function_graph(tmp_path / "fn.onnx")
    cache = tmp_path / "timing.cache"
    first = build_engine(onnx_path=onnx_path, output=tmp_path / "fn.plan", backend="tensorrt-rtx",
                         timing_cache=cache, progress=False).data
    assert_report_matches_onnx(first, onnx_path, targets=["sm89"])
    assert first["precision"]["custom_ops"] == {"lily::HPMix": 1}
    assert cache.is_file() and first["timing_cache"]["saved_bytes"] == cache.stat().st_size > 0
    assert first["timing_cache"]["loaded_bytes"] == 0
    second = build_engine(onnx_path=onnx_path, output=tmp_path / "fn2.plan", backend="tensorrt-rtx",
                          timing_cache=cache, progress=False).data
    assert second["timing_cache"]["loaded_bytes"] == cache.stat().st_size
    if not _cuda():
        assert any("no GPU here: built ahead of time for sm89" in n for n in first["notes"])


# ---------------------------------------------------------------------------------------
# bad input, through the CLI
# ---------------------------------------------------------------------------------------

@pytest.mark.trt
@needs_rtx
def test_unparseable_onnx_names_node_and_function(tmp_path):
    bad = _function_graph(tmp_path / "bad.onnx", bad_inner=True)
    result = _run(["build-trt", str(bad), "-o", str(tmp_path / "bad.plan"), "--backend", "tensorrt-rtx"])
    _assert_user_error(result, "node 'bad_inner' (StringNormalizer)", "in local function layer0.hpmix (HPMix)")
    assert not (tmp_path / "bad.plan").exists() and not _no_partials(tmp_path)
    nobody = _function_graph(tmp_path / "nobody.onnx", with_body=False)
    result = _run(["build-trt", str(nobody), "-o", str(tmp_path / "nobody.plan"), "--backend", "tensorrt-rtx"])
    _assert_user_error(result, "node 'layer0.hpmix' (lily::HPMix)", "FunctionProto body")


def _external_graph(folder: Path, location: str) -> Path:
    """The function graph saved as ``folder/fn.onnx`` with its weights in ``folder/location``."""
    import onnx

    folder.mkdir(exist_ok=True)
    model = onnx.load(str(_function_graph(folder / "src.onnx")))
    out = folder / "fn.onnx"
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    assert (folder / location).is_file()
    return out


def test_outputs_never_replace_inputs(tmp_path):
    """The engine, its report and the timing cache may not be the ONNX, its weights, or one another."""
    onnx_path = _external_graph(tmp_path / "a", "fn.onnx.data")
    data = onnx_path.with_name("fn.onnx.data")
    other = _external_graph(tmp_path / "b", "weights.bin")
    weights = other.with_name("weights.bin")
    engine = tmp_path / "x.plan"
    as_json = _function_graph(tmp_path / "e.plan.json")  # an ONNX named like the report of -o e.plan
    as_plan = _function_graph(tmp_path / "m.plan")  # an ONNX named like an engine: the default -o is itself
    kept = "inputs are never overwritten"
    cases = [
        ([onnx_path, "-o", onnx_path], f"-o {onnx_path}: is the input ONNX model {onnx_path}", kept),
        ([onnx_path, "-o", data], f"-o {data}: is fn.onnx.data, a file of the input ONNX model {onnx_path}", kept),
        ([other, "-o", weights], f"-o {weights}: is the input ONNX model's weights {weights}", kept),
        ([as_json, "-o", tmp_path / "e.plan"], f"-o {as_json}: is the input ONNX model {as_json}", kept),
        ([as_plan], f"-o {as_plan}: is the input ONNX model {as_plan}", kept),
        ([onnx_path, "-o", engine, "--timing-cache", onnx_path],
         f"--timing-cache {onnx_path}: is the input ONNX model {onnx_path}", kept),
        ([onnx_path, "-o", engine, "--timing-cache", data], f"--timing-cache {data}: is fn.onnx.data, a file of", kept),
        ([onnx_path, "-o", engine, "--timing-cache", engine], f"--timing-cache {engine}: is the engine too", "its own"),
        ([onnx_path, "-o", engine, "--timing-cache", report_path(engine)], "is the engine's report too", "its own"),
    ]
    inputs = [onnx_path, data, other, weights, as_json, as_plan]
    before = {p: p.read_bytes() for p in inputs}
    for args, message, tail in cases:
        result = _run(["build-trt", *map(str, args)])
        _assert_user_error(result, message, tail)
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert {p: p.read_bytes() for p in inputs} == before
    assert not engine.exists() and not report_path(engine).exists()
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


def test_not_an_onnx_file(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07this is not protobuf" * 10)
    _assert_user_error(_run(["build-trt", str(junk), "-o", str(tmp_path / "j.plan")]), "not an ONNX model")
    _assert_user_error(_run(["build-trt", str(tmp_path / "missing.onnx")]), "no such ONNX file")


@pytest.mark.parametrize("flags, flag, message", [
    (["--shapes", "input_ids:1x"], "--shapes", "'input_ids:1x'"),
    (["--shapes", "x:1x8x2"], "--shapes", "has 2 dims"),
    (["--shapes", "x:4x9"], "--shapes", "fixed at 8"),
    (["--min-shapes", "x:8x8", "--opt-shapes", "x:4x8"], "--opt-shapes", "min 8, opt 4"),
    (["--workspace", "lots"], "--workspace", "'lots'"),
    (["--workspace", "1KiB"], "--workspace", "1.0 KiB is too small"),
    (["--shapes", "x:1x8", "--max-shapes", "x:4x8"], "--shapes", "do not mix"),
    (["--min-shapes", "x:1x8", "--max-shapes", "x:4x8", "--max-shapes", "x:8x8"], "--min-shapes", "once per profile"),
    (["--compute-capability", "eighty-nine"], "--compute-capability", "expected a target such as sm89"),
])
def test_malformed_flags(tmp_path, flags, flag, message):
    """Bad flag values are usage errors (exit 2) naming the flag, found before any build."""
    onnx_path = _function_graph(tmp_path / "fn.onnx")
    result = _run(["build-trt", str(onnx_path), "-o", str(tmp_path / "x.plan"), *flags])
    _assert_usage_error(result, flag, message)
    assert not (tmp_path / "x.plan").exists()


@pytest.mark.skipif(HAS_TRT, reason="standard TensorRT is installed here")
def test_backend_tensorrt_not_installed(tmp_path):
    onnx_path = _function_graph(tmp_path / "fn.onnx")
    result = _run(["build-trt", str(onnx_path), "--backend", "tensorrt"])
    _assert_user_error(result, "TensorRT (module tensorrt) is not installed", "pip install 'lily-deploy[tensorrt]'")


@pytest.mark.trt
@needs_rtx
def test_rtx_specific_user_errors(tmp_path):
    onnx_path = _function_graph(tmp_path / "fn.onnx")
    _assert_usage_error(_run(["build-trt", str(onnx_path), "--compute-capability", "sm91"]),
                        "--compute-capability", "'sm91'", "sm89")
    _assert_usage_error(_run(["build-trt", str(onnx_path), "--backend", "tensorrt-rtx", "--fp16"]),
                        "--fp16", "has no precision flags")
    if not _cuda():
        _assert_usage_error(_run(["build-trt", str(onnx_path), "--compute-capability", "current"]),
                            "--compute-capability", "no GPU is visible here")


@pytest.mark.trt
@needs_rtx
def test_workspace_too_small(lily_onnx, tmp_path):
    """1 MiB passes the config's floor but not the builder: still a usage error naming --workspace."""
    engine = tmp_path / "small.plan"
    result = _run(["build-trt", str(lily_onnx), "-o", str(engine), "--backend", "tensorrt-rtx", "--workspace", "1MiB"])
    _assert_usage_error(result, "--workspace", "1.0 MiB is too small", "raise it")
    assert not engine.exists() and not report_path(engine).exists() and not _no_partials(tmp_path)


@pytest.mark.trt
@needs_rtx
def test_sm75_fp32_gemm_explained(lily_onnx, tmp_path):
    result = _run(["build-trt", str(lily_onnx), "-o", str(tmp_path / "t.plan"), "--compute-capability", "sm75"])
    _assert_user_error(result, "FP32 GEMM is not supported", "hint: TensorRT-RTX has no FP32 matrix multiply")


def test_unwritable_output(tmp_path):
    onnx_path = _function_graph(tmp_path / "fn.onnx")
    _assert_user_error(_run(["build-trt", str(onnx_path), "-o", str(tmp_path / "nope" / "m.plan")]),
                       "-o", "does not exist")
    (tmp_path / "adir").mkdir()
    _assert_user_error(_run(["build-trt", str(onnx_path), "-o", str(tmp_path / "adir")]), "is a folder")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        _assert_user_error(_run(["build-trt", str(onnx_path), "-o", str(ro / "m.plan")]), "not writable")


@pytest.mark.trt
@needs_rtx
def test_keyboard_interrupt_leaves_nothing(tmp_path, monkeypatch):
    onnx_path = _function_graph(tmp_path / "fn.onnx")
    engine = tmp_path / "ctrlc.plan"

    def interrupted(builder, network, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_trt, "_build_serialized", interrupted)
    result = _run(["build-trt", str(onnx_path), "-o", str(engine), "--backend", "tensorrt-rtx"])
    assert result.exit_code == 130 and "interrupted" in result.output
    assert not engine.exists() and not report_path(engine).exists() and not _no_partials(tmp_path)


@pytest.mark.trt
@needs_rtx
def test_real_sigint_cancels_the_build(lily_onnx, tmp_path, monkeypatch):
    """A real SIGINT mid-build: the progress monitor cancels TensorRT, nothing is left behind."""
    engine = tmp_path / "sigint.plan"
    real = build_trt._build_serialized

    def build_then_sigint(builder, network, config):
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        return real(builder, network, config)

    monkeypatch.setattr(build_trt, "_build_serialized", build_then_sigint)
    with pytest.raises(KeyboardInterrupt):
        build_engine(onnx_path=lily_onnx, output=engine, backend="tensorrt-rtx", progress=False)
    assert not engine.exists() and not report_path(engine).exists() and not _no_partials(tmp_path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler is gone again


# ---------------------------------------------------------------------------------------
# the plugin route
# ---------------------------------------------------------------------------------------

def test_marked_graph_still_runs_in_onnxruntime(lily_onnx, tmp_path):
    import onnx
    import onnxruntime as ort

    from lily_deploy.converters.trt_plugin import PLUGIN_NAMESPACE, mark_plugin_nodes

    model = onnx.load(str(lily_onnx))
    marked = mark_plugin_nodes(model)
    assert len(marked) == 12
    for node in model.graph.node:
        if node.op_type == "HPMix":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode() and attrs["plugin_version"] == b"1"
    onnx.save(model, str(tmp_path / "marked.onnx"))
    feeds = _feeds_for(lily_onnx)
    ref = ort.InferenceSession(str(lily_onnx), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "marked.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(got, ref)


@pytest.mark.trt
@needs_rtx
def test_plugin_route_builds_or_says_why(lily_onnx, tmp_path):
    from lily_deploy.converters.trt_plugin import probe_python_plugins

    engine = tmp_path / "plugin.plan"
    why = probe_python_plugins("tensorrt_rtx")
    result = _run(["build-trt", str(lily_onnx), "-o", str(engine), "--backend", "tensorrt-rtx", "--plugin-route"])
    if why is None:
        assert result.exit_code == 0, result.output
        report = json.loads(report_path(engine).read_text())
        assert report["route"].startswith("plugin (12 lily::HPMix")
        assert_report_matches_onnx(report, lily_onnx)
    else:  # TensorRT-RTX 1.7 aborts on Python-defined plugins: a clear error, not a crash
        _assert_user_error(result, "--plugin-route", "cannot host the Python-defined lily::HPMix plugin",
                           "function inlining")
        assert not engine.exists() and not _no_partials(tmp_path)


def test_plugin_route_needs_hpmix_nodes(tmp_path):
    onnx_path = _function_graph(tmp_path / "fn.onnx")
    import onnx

    m = onnx.load(str(onnx_path))
    m.graph.node[1].op_type = "Other"
    m.functions[0].name = "Other"
    onnx.save(m, str(tmp_path / "other.onnx"))
    _assert_usage_error(_run(["build-trt", str(tmp_path / "other.onnx"), "--plugin-route"]), "--plugin-route",
                        "no lily::HPMix nodes")


# ---------------------------------------------------------------------------------------
# GPU only: the runner, parity with onnxruntime, the plugin's CUDA implementation
# ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("mode, masked", [("token", False), ("sample", True), ("sample", False), ("batch", False)])
def test_plugin_cuda_implementation_matches_reference(mode, masked):
    import torch

    from lily_deploy.converters.hpmix import hp_mix_reference
    from lily_deploy.converters.trt_plugin import hpmix_on_pointers

    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, r, E, d = 3, 7, 4, 3, 10
    h = torch.randn(B, T, r, generator=g).cuda()
    logits = torch.randn(B, T, E, generator=g).cuda()
    hp = torch.randn(E * r, d, generator=g).cuda()
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[0, 4:] = 0
    mask = mask.cuda()
    out = torch.empty(B, T, d, device="cuda")
    ins = [(t.data_ptr(), tuple(t.shape), "<f4") for t in (h, logits, hp)]
    if masked:
        ins.append((mask.data_ptr(), tuple(mask.shape), "<i8"))
    stream = torch.cuda.Stream()
    hpmix_on_pointers(ins, (out.data_ptr(), tuple(out.shape), "<f4"), stream.cuda_stream, mode, 0.5)
    stream.synchronize()
    ref = hp_mix_reference(h, logits, hp, mask if masked else None, mode, 0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _gpu_engine(onnx_path, tmp_path, **kw):
    backend = "tensorrt" if HAS_TRT else "tensorrt-rtx"
    if backend == "tensorrt-rtx":
        import torch

        from lily_deploy.runtime.tensorrt import load_backend, rtx_supports

        cc = "sm%d%d" % torch.cuda.get_device_capability()
        if not rtx_supports(load_backend("tensorrt-rtx"), cc):
            pytest.skip(f"TensorRT-RTX does not run on this GPU ({cc}; e.g. Hopper): needs standard TensorRT here")
    extra = {"compute_capabilities": ["current"]} if backend == "tensorrt-rtx" else {}
    return build_engine(onnx_path=onnx_path, output=tmp_path / "gpu.plan", backend=backend, progress=False,
                        **extra, **kw)


@pytest.mark.gpu
@pytest.mark.trt
@needs_gpu
@needs_any_trt
def test_runner_parity_with_onnxruntime(lily_onnx, tmp_path):
    import onnxruntime as ort

    report = _gpu_engine(lily_onnx, tmp_path, min_shapes=["input_ids:1x1", "input_ids:9x1"],
                         max_shapes=["input_ids:8x64", "input_ids:32x128"]).data
    assert report["layers"] and report["layers"]["count"] > 0  # engine inspector ran on the GPU
    sess = ort.InferenceSession(str(lily_onnx), providers=["CPUExecutionProvider"])
    with TrtRunner(report["engine"]["path"]) as runner:
        for n, length, profile in ((4, 16, 0), (12, 64, 1)):
            feeds = _feeds_for(lily_onnx, n, length)
            got = runner(feeds)["logits"]
            assert runner.active_profile == profile
            ref = sess.run(None, feeds)[0]
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
        with pytest.raises(LilyDeployError, match="fit no optimization profile"):
            runner(_feeds_for(lily_onnx, 40, 16))


@pytest.mark.gpu
@pytest.mark.trt
@needs_gpu
@needs_any_trt
def test_runner_refuses_engine_for_another_gpu(lily_onnx, tmp_path):
    report = _gpu_engine(lily_onnx, tmp_path, shapes=["input_ids:1x16"]).data
    path = report_path(report["engine"]["path"])
    data = json.loads(path.read_text())
    data["target"]["compute_capabilities"] = ["sm1"]
    path.write_text(json.dumps(data))
    with pytest.raises(LilyDeployError, match="was built for sm1"):
        TrtRunner(report["engine"]["path"])
    data["backend"]["version"] = "0.0.1"
    path.write_text(json.dumps(data))
    with pytest.raises(LilyDeployError, match="built with .* 0.0.1, this machine has"):
        TrtRunner(report["engine"]["path"])


@pytest.mark.gpu
@pytest.mark.trt
@needs_gpu
@needs_any_trt
def test_plugin_route_engine_runs(lily_onnx, tmp_path):
    import onnxruntime as ort

    from lily_deploy.converters.trt_plugin import probe_python_plugins

    module = "tensorrt" if HAS_TRT else "tensorrt_rtx"
    why = probe_python_plugins(module)
    if why is not None:
        pytest.skip(f"{module} cannot host Python plugins here: {why}")
    report = _gpu_engine(lily_onnx, tmp_path, plugin_route=True, max_shapes=["input_ids:8x64"]).data
    assert report["route"].startswith("plugin")
    feeds = _feeds_for(lily_onnx, 4, 16)
    ref = ort.InferenceSession(str(lily_onnx), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with TrtRunner(report["engine"]["path"]) as runner:
        np.testing.assert_allclose(runner(feeds)["logits"], ref, rtol=1e-3, atol=1e-3)
