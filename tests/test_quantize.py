"""quantize and calib/: INT8 Q/DQ and FP16 graphs of MiniLM+Lily from real sst2 rows, their structure
(symmetric, per-channel, float biases, lily::HPMix handled by position), accuracy against fp32, TensorRT
for RTX builds, the calibration readers and cache, and bad input through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import build_rtx_engine, data_file
from lily_deploy.cli import cli

CALIB_ROWS = 48
VAL_ROWS = 128  # one row is 0.78 accuracy points: the budgets below are sized for that


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------

def _rows(path: Path, n: int, skip: int = 0) -> list[str]:
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        lines = [l for _, l in zip(range(skip + n), f)][skip:]
    return [header] + lines


@pytest.fixture(scope="module")
def sst2_slice(tmp_path_factory) -> Path:
    """A small slice of sst2/dev.tsv: calibration rows and held-out rows come from it."""
    out = tmp_path_factory.mktemp("data") / "dev_slice.tsv"
    out.write_text("".join(_rows(data_file("sst2", "dev.tsv"), CALIB_ROWS + VAL_ROWS)))
    return out


@pytest.fixture(scope="module")
def trained_adapter(minilm_adapter, tmp_path_factory) -> Path:
    """The random-HP Lily adapter with its classifier fitted on 256 sst2 training rows.

    A random head gives logits a hair apart, where any rounding flips top-1; a fitted head has
    real margins, so the accuracy checks below measure quantization and not noise.
    """
    from lily_deploy.core.adapters import load_adapter
    from lily_deploy.core.data import read_text_table

    table = read_text_table(data_file("sst2", "train.tsv"), limit=256)
    peft_model, base, _ = load_adapter(minilm_adapter)
    peft_model.eval()
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    feats = []
    hook = head.register_forward_hook(lambda m, args, out: feats.append(args[0].detach()))
    try:
        with torch.no_grad():
            for s in range(0, len(table), 64):
                enc = base.tokenizer(table.texts[s:s + 64], padding=True, truncation=True, return_tensors="pt")
                peft_model(**enc)
    finally:
        hook.remove()
    x = torch.cat(feats)
    y = torch.tensor([int(l) for l in table.labels])
    torch.manual_seed(0)
    w = torch.zeros(2, x.shape[1], requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    out = tmp_path_factory.mktemp("trained") / "adapter"
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def fp32_onnx(trained_adapter, tmp_path_factory) -> Path:
    from lily_deploy.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export_onnx(source=trained_adapter, output=path).passed
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def int8_run(fp32_onnx, sst2_slice, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    result = CliRunner().invoke(cli, ["quantize", str(fp32_onnx), "--int8", "--calib", str(sst2_slice),
                                      "--calib-size", str(CALIB_ROWS), "--val-size", str(VAL_ROWS),
                                      # 4 points = 5 of 128 rows of a tiny model calibrated on 48 rows
                                      "--max-accuracy-drop", "4", "--cache-dir", str(cache_dir), "-o", str(out)])
    return result, out


@pytest.fixture(scope="module")
def fp16_run(fp32_onnx, sst2_slice, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "model.fp16.onnx"
    result = CliRunner().invoke(cli, ["quantize", str(fp32_onnx), "--fp16", "--val", str(sst2_slice),
                                      "--val-size", str(VAL_ROWS), "--max-accuracy-drop", "0.1",
                                      "--cache-dir", str(cache_dir), "-o", str(out)])
    return result, out


def _meta(model) -> dict:
    return {p.key: p.value for p in model.metadata_props}


def _tiny_float_onnx(path: Path, features: int = 8, classes: int = 3) -> Path:
    """A hand-made fp32 graph with a float input (x -> MatMul -> Relu -> Gemm -> logits)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((features, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((3, 16)).astype(np.float32)[:classes], "w2")
    b2 = numpy_helper.from_array(np.zeros(classes, np.float32), "b2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="gemm", transB=1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], [w1, w2, b2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------------------
# INT8
# ---------------------------------------------------------------------------------------

def test_int8_end_to_end_accuracy(int8_run):
    result, out = int8_run
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and out.is_file()
    model = onnx.load(str(out))
    info = json.loads(_meta(model)["lily_deploy.quantization"])
    v = info["validation"]
    assert v["rows"] == VAL_ROWS and v["passed"]
    assert v["accuracy_fp32"] > 70  # the fitted head is a real classifier
    assert v["accuracy_fp32"] - v["accuracy"] <= 4.0  # 5 rows of 128 (a head-only model has thin margins)
    assert v["top1_agreement"] >= 0.85
    assert info["target"] == "tensorrt" and "zero point 0" in info["activations"]
    assert info["input_sqnr_db"] and min(info["input_sqnr_db"].values()) > 5
    # the default SQNR floor: every MatMul whose input lost more than 18 dB is fp32 in the written graph
    assert info["min_sqnr_db"] == 18.0
    lossy = {n for n, db in info["input_sqnr_db"].items() if db < 18.0}
    assert lossy <= set(json.loads(_meta(model)["lily_deploy.excluded_nodes"]))
    assert info["calib_rows"] == CALIB_ROWS and info["calib_method"] == "minmax"


def test_int8_graph_is_tensorrt_form(int8_run, fp32_onnx):
    """Symmetric (zero points 0) int8, per-channel weights, no int32 biases, HPMix inlined, LP/router quantized."""
    _, out = int8_run
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q and dq
    for n in q + dq:
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    # weights: int8 initializers behind a DequantizeLinear with one scale per output channel
    weight_dq = [n for n in dq if n.input[0] in inits]
    assert weight_dq and all(inits[n.input[0]].dtype == np.int8 for n in weight_dq)
    assert any(inits[n.input[1]].size > 1 for n in weight_dq)
    assert not [t for t in model.graph.initializer if t.data_type == TensorProto.INT32]
    assert not model.functions and not [n for n in model.graph.node if n.domain == "lily"]
    meta = _meta(model)
    assert meta["lily_deploy.precision"] == "int8"
    info = json.loads(meta["lily_deploy.quantization"])
    assert info["adapter_precision"] == "int8" and len(info["adapter_layers"]) == 12
    producers = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    for layer in info["adapter_layers"]:
        for name in [layer["lp"], layer["router"], *layer["hp_matmuls"]]:
            assert all(producers[i].op_type == "DequantizeLinear" for i in by_name[name].input)
    # softmax and mixing vector are fp32: no Q/DQ touches them
    excluded = json.loads(meta["lily_deploy.excluded_nodes"])
    for name in excluded:
        if name in by_name:
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear"
                       for i in by_name[name].input), name
    assert any(name.endswith("/probs") for name in excluded)
    # metadata of the fp32 export is kept
    source = _meta(onnx.load(str(fp32_onnx)))
    assert meta["lily_deploy.base_model"] == source["lily_deploy.base_model"]


def test_int8_adapter_fp32_exclusions_sqnr_and_onnxruntime_form(fp32_onnx, sst2_slice, cache_dir, tmp_path):
    from lily_deploy.precision import SQNR_KEY, quantize

    out = tmp_path / "m.onnx"
    r = quantize(model_path=fp32_onnx, output=out, precision="int8", calib=sst2_slice, calib_size=16, val_size=16, adapter_precision="fp32",
                 exclude_op_types=["Gemm"], exclude_nodes=["node_linear"], calib_method="percentile",
                 int8_target="onnxruntime", min_sqnr=25.0, cache_dir=cache_dir, progress=False,
                 max_accuracy_drop=100)
    assert r.written and r.validation.rows == 16
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    info = json.loads(_meta(model)["lily_deploy.quantization"])
    assert info["adapter_precision"] == "fp32" and info["calib_method"] == "percentile"
    excluded = set(json.loads(_meta(model)["lily_deploy.excluded_nodes"]))
    for layer in info["adapter_layers"]:
        for name in [layer["lp"], layer["router"], *layer["hp_matmuls"]]:
            assert name in excluded
            assert not any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                           for i in by_name[name].input)
    for n in model.graph.node:
        if n.op_type == "Gemm" or n.name == "node_linear":
            assert n.name in excluded
    # --min-sqnr: the lossy nodes of the first pass are fp32 in the second
    lossy = [n for n, db in r.sqnr.items() if db < 25.0]
    assert lossy and sorted(lossy) == sorted(r.kept_fp32[SQNR_KEY]) and set(lossy) <= excluded
    for name in lossy:
        assert not any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                       for i in by_name[name].input)
    assert r.int8_matmuls > 20  # the base model's other projections are still int8
    # onnxruntime form: uint8 activations with zero points, int8 weights
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    act_zp = {inits[n.input[2]].dtype for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert act_zp == {np.dtype(np.uint8)} and info["target"] == "onnxruntime"


# ---------------------------------------------------------------------------------------
# FP16
# ---------------------------------------------------------------------------------------

def test_fp16_end_to_end_accuracy(fp16_run):
    result, out = fp16_run
    assert result.exit_code == 0, result.output
    assert "sensitive ops kept fp32" in result.output
    model = onnx.load(str(out))
    meta = _meta(model)
    assert meta["lily_deploy.precision"] == "fp16"
    info = json.loads(meta["lily_deploy.quantization"])
    v = info["validation"]
    assert v["rows"] == VAL_ROWS and abs(v["accuracy_fp32"] - v["accuracy"]) <= 0.1
    assert v["top1_agreement"] >= 0.99 and v["max_abs"] < 5e-2
    # fp32 inputs/outputs, fp16 weights, sensitive ops fed fp32
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    kept = set(json.loads(meta["lily_deploy.excluded_nodes"]))
    ops = {n.name: n.op_type for n in model.graph.node}
    assert {"Softmax", "LayerNormalization"} <= {ops[n] for n in kept if n in ops}
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "Softmax":
            src = producers[n.input[0]]
            assert src.op_type == "Cast" and src.attribute[0].i == TensorProto.FLOAT


# ---------------------------------------------------------------------------------------
# TensorRT for RTX
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["int8", "fp16"])
def test_quantized_graphs_build_with_tensorrt_rtx(which, int8_run, fp16_run, tmp_path):
    _, out = {"int8": int8_run, "fp16": fp16_run}[which]
    assert out.is_file()
    report = build_rtx_engine(out, tmp_path / f"{which}.plan")
    precision = report["precision"]  # the builder reads the graph's precision the same way
    assert (precision["quantize_linear"] > 0) if which == "int8" else ("fp16" in precision["label"])


# ---------------------------------------------------------------------------------------
# calibration readers
# ---------------------------------------------------------------------------------------

def test_calibration_reader_cache_and_split(fp32_onnx, sst2_slice, tmp_path):
    from lily_deploy.calib.readers import choose_rows, load_calibration, onnx_input_specs, resolve_tokenizer

    model = onnx.load(str(fp32_onnx))
    specs = onnx_input_specs(model)
    tok = resolve_tokenizer(base_model=_meta(model)["lily_deploy.base_model"])
    first = load_calibration(sst2_slice, specs, size=20, seed=3, batch_size=8, tokenizer=tok, cache_dir=tmp_path,
                             progress=False)
    assert not first.from_cache and len(first) == 20 and len(first.batches) == 3
    assert set(first.batches[0]) == {s.name for s in specs}
    assert all(a.dtype == np.int64 for b in first.batches for a in b.values())
    again = load_calibration(sst2_slice, specs, size=20, seed=3, batch_size=8, tokenizer=tok, cache_dir=tmp_path,
                             progress=False)
    assert again.from_cache and again.rows == first.rows and again.labels == first.labels
    for a, b in zip(first.batches, again.batches):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    other = load_calibration(sst2_slice, specs, size=20, seed=4, batch_size=8, tokenizer=tok, cache_dir=tmp_path,
                             progress=False)
    assert not other.from_cache and other.rows != first.rows
    assert len(list(tmp_path.glob("*.npz"))) == 2
    # the ORT reader yields each batch once, then None; rewind starts over
    reader = first.reader()
    got = [reader.get_next() for _ in range(4)]
    assert got[3] is None and got[0] is first.batches[0]
    reader.rewind()
    assert reader.get_next() is first.batches[0]
    # torch view for router statistics
    t = next(first.torch_batches())
    assert isinstance(t["input_ids"], torch.Tensor)
    # held-out rows never overlap calibration rows
    held = choose_rows(first.total_rows, None, 0, exclude=first.rows)
    assert not set(held) & set(first.rows) and len(held) + 20 == first.total_rows


def _text_specs(dtype=np.int64):
    from lily_deploy.calib.readers import InputSpec

    return [InputSpec(n, dtype, ["batch", "sequence"]) for n in ("input_ids", "attention_mask", "token_type_ids")]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from lily_deploy.calib.readers import resolve_tokenizer

    return resolve_tokenizer(tokenizer="minilm")


def _load_cached(path, cache, tok, specs=None):
    from lily_deploy.calib.readers import load_calibration

    return load_calibration(path, specs or _text_specs(), size=12, seed=1, batch_size=4, tokenizer=tok,
                            cache_dir=cache, progress=False)


def _same_batches(a, b) -> bool:
    return len(a.batches) == len(b.batches) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a.batches, b.batches))


def test_cache_with_tampered_tensors_is_rebuilt(sst2_slice, minilm_tokenizer, tmp_path):
    from lily_deploy.calib.readers import CalibrationWarning

    cache = tmp_path / "cache"
    first = _load_cached(sst2_slice, cache, minilm_tokenizer)
    [file] = list(cache.glob("*.npz"))
    with np.load(file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["b0/input_ids"] = arrays["b0/input_ids"].copy()
    arrays["b0/input_ids"][0, 1] += 1  # a valid .npz whose tensors no longer match its checksum
    with open(file, "wb") as f:
        np.savez(f, **arrays)
    with pytest.warns(CalibrationWarning, match="does not match its checksum.*rebuilding it"):
        rebuilt = _load_cached(sst2_slice, cache, minilm_tokenizer)
    assert not rebuilt.from_cache and _same_batches(rebuilt, first) and rebuilt.rows == first.rows
    again = _load_cached(sst2_slice, cache, minilm_tokenizer)  # the rebuilt cache is good again
    assert again.from_cache and _same_batches(again, first) and again.labels == first.labels


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_cache_is_rebuilt(sst2_slice, minilm_tokenizer, tmp_path, damage):
    from lily_deploy.calib.readers import CalibrationWarning

    cache = tmp_path / "cache"
    first = _load_cached(sst2_slice, cache, minilm_tokenizer)
    [file] = list(cache.glob("*.npz"))
    data = file.read_bytes()
    file.write_bytes({"garbage": b"this is not a cache\n" * 50, "truncated": data[:len(data) // 2],
                      "empty": b""}[damage])
    with pytest.warns(CalibrationWarning, match="is unreadable.*rebuilding it") as caught:
        rebuilt = _load_cached(sst2_slice, cache, minilm_tokenizer)
    assert all("\n" not in str(w.message) for w in caught)  # one line each
    assert not rebuilt.from_cache and _same_batches(rebuilt, first)
    assert _load_cached(sst2_slice, cache, minilm_tokenizer).from_cache


def test_cache_rebuild_is_one_warning_line_through_the_cli(tmp_path, fp32_onnx, sst2_slice):
    cache = tmp_path / "cache"
    args = [fp32_onnx, "--fp16", "--val", sst2_slice, "--val-size", 8, "--max-length", 16,
            "--max-accuracy-drop", 100, "--cache-dir", cache]
    assert _invoke(*args, "-o", tmp_path / "a.onnx").exit_code == 0
    [file] = list(cache.glob("*.npz"))
    file.write_bytes(b"garbage")
    result = _invoke(*args, "-o", tmp_path / "b.onnx")
    assert result.exit_code == 0, result.output
    warned = [l for l in result.output.splitlines() if l.startswith("warning: calibration cache")]
    assert len(warned) == 1 and "rebuilding it" in warned[0] and "Traceback" not in result.output
    assert (tmp_path / "b.onnx").is_file()


def test_data_edited_in_place_or_another_model_misses_the_cache(sst2_slice, minilm_tokenizer, tmp_path):
    import os

    data = tmp_path / "data.tsv"
    data.write_text("".join(_rows(sst2_slice, 12)))
    cache = tmp_path / "cache"
    first = _load_cached(data, cache, minilm_tokenizer)
    assert _load_cached(data, cache, minilm_tokenizer).from_cache
    # the same size and modification time, one word changed: only the content tells
    st = data.stat()
    lines = data.read_text().splitlines(keepends=True)
    text, label = lines[1].rsplit("\t", 1)
    words = text.split(" ")
    words[0] = "z" * len(words[0])
    lines[1] = " ".join(words) + "\t" + label
    data.write_text("".join(lines))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.stat().st_size == st.st_size and data.stat().st_mtime_ns == st.st_mtime_ns
    edited = _load_cached(data, cache, minilm_tokenizer)
    assert not edited.from_cache and not _same_batches(edited, first)
    assert not np.array_equal(edited.batches[0]["input_ids"][0], first.batches[0]["input_ids"][0])
    # a model whose inputs differ (int32 ids) gets its own tensors
    other = _load_cached(data, cache, minilm_tokenizer, specs=_text_specs(np.int32))
    assert not other.from_cache and other.batches[0]["input_ids"].dtype == np.int32
    assert len(list(cache.glob("*.npz"))) == 3


def test_tokenizer_resolution(minilm_adapter, tmp_path):
    from lily_deploy.calib.readers import resolve_tokenizer
    from lily_deploy.core.errors import LilyDeployError

    by_model = resolve_tokenizer(model=str(minilm_adapter))
    by_meta = resolve_tokenizer(base_model="minilm")
    by_name = resolve_tokenizer(tokenizer="minilm")
    assert by_model.identity == by_meta.identity == by_name.identity
    assert by_model.tokenizer("a good film")["input_ids"] == by_meta.tokenizer("a good film")["input_ids"]
    with pytest.raises(LilyDeployError, match="--tokenizer"):
        resolve_tokenizer(tokenizer=str(tmp_path))
    with pytest.raises(LilyDeployError, match="names no base model"):
        resolve_tokenizer(onnx_path="x.onnx")
    with pytest.raises(LilyDeployError, match="--tokenizer DIR"):
        resolve_tokenizer(base_model=str(tmp_path / "gone"), onnx_path="x.onnx")


# ---------------------------------------------------------------------------------------
# bad input, through the CLI
# ---------------------------------------------------------------------------------------

def _invoke(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


def _fails(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_calibration_row_is_named(tmp_path, bad):
    model = _tiny_float_onnx(tmp_path / "tiny.onnx")
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    x[17, 3] = bad
    np.savez(tmp_path / "calib.npz", x=x)
    result = _invoke(model, "--int8", "--calib", tmp_path / "calib.npz", "--no-cache", "-o", tmp_path / "q.onnx")
    _fails(result, "row 17", "'x'", "NaN" if np.isnan(bad) else "Inf")
    assert not (tmp_path / "q.onnx").exists()


def test_fewer_samples_warns_or_fails_strict(tmp_path):
    model = _tiny_float_onnx(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((12, 8)).astype(np.float32))
    np.savez(tmp_path / "val.npz", x=rng.standard_normal((32, 8)).astype(np.float32))
    common = ["--int8", "--calib", tmp_path / "calib.npz", "--val", tmp_path / "val.npz", "--calib-size", 50,
              "--max-accuracy-drop", 20, "--no-cache"]
    ok = _invoke(model, *common, "-o", tmp_path / "q.onnx")
    assert ok.exit_code == 0, ok.output
    assert "12 samples available, fewer than the 50 asked for" in ok.output
    assert "top-1 disagreement" in ok.output  # no labels: the budget applies to top-1 changes
    assert (tmp_path / "q.onnx").is_file()
    strict = _invoke(model, *common, "--strict", "-o", tmp_path / "q2.onnx")
    _fails(strict, "fewer than the 50 asked for", "(strict)")
    assert not (tmp_path / "q2.onnx").exists()


def test_already_quantized_is_refused(int8_run, fp16_run, sst2_slice, tmp_path):
    for _, out in (int8_run, fp16_run):
        result = _invoke(out, "--int8", "--calib", sst2_slice, "-o", tmp_path / "again.onnx")
        _fails(result, "already quantized", str(out))
    assert "QuantizeLinear" in _invoke(int8_run[1], "--fp16", "--val", sst2_slice, "-o", tmp_path / "a.onnx").output
    assert "fp16" in _invoke(fp16_run[1], "--fp16", "--val", sst2_slice, "-o", tmp_path / "a.onnx").output


def test_calibration_inputs_must_match_the_model(fp32_onnx, sst2_slice, tmp_path):
    # an .npz whose arrays are not the model's inputs
    np.savez(tmp_path / "wrong.npz", pixel_values=np.zeros((4, 3, 8, 8), np.float32))
    result = _invoke(fp32_onnx, "--int8", "--calib", tmp_path / "wrong.npz", "-o", tmp_path / "q.onnx")
    _fails(result, "wrong.npz", "no array for model input", "input_ids", "pixel_values are not model inputs")
    # right names, wrong dtype
    ids = np.zeros((4, 9), np.float32)
    np.savez(tmp_path / "float_ids.npz", input_ids=ids, attention_mask=ids, token_type_ids=ids)
    result = _invoke(fp32_onnx, "--int8", "--calib", tmp_path / "float_ids.npz", "-o", tmp_path / "q.onnx")
    _fails(result, "'input_ids' is float32", "int64")
    # text for a model whose input is a float tensor
    model = _tiny_float_onnx(tmp_path / "tiny.onnx")
    result = _invoke(model, "--int8", "--calib", sst2_slice, "-o", tmp_path / "q.onnx")
    _fails(result, "text cannot feed model input 'x'")
    # an .npz with the wrong feature size
    np.savez(tmp_path / "narrow.npz", x=np.zeros((4, 5), np.float32))
    result = _invoke(model, "--int8", "--calib", tmp_path / "narrow.npz", "-o", tmp_path / "q.onnx")
    _fails(result, "'x' has shape [4, 5]")
    assert not (tmp_path / "q.onnx").exists()


def _usage(result, flag, *needles):
    """A usage error (exit 2, no traceback) naming ``flag``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in (f"'{flag}'", *needles):
        assert needle in result.output, result.output


def test_flag_errors(fp32_onnx, sst2_slice, tmp_path):
    _usage(_invoke(fp32_onnx, "--int8", "-o", tmp_path / "q.onnx"), "--calib")
    generated = _invoke(fp32_onnx, "--fp16", "-o", tmp_path / "g.onnx")  # no data: generated inputs, said so
    assert generated.exit_code == 0 and "validated on 64 generated inputs" in generated.output, generated.output
    _usage(_invoke(fp32_onnx, "--int8", "--calib", sst2_slice, "--exclude-nodes", "no_such_node",
                   "-o", tmp_path / "q.onnx"), "--exclude-nodes", "no_such_node")
    _usage(_invoke(fp32_onnx, "--int8", "--calib", sst2_slice, "--exclude-op-types", "Conv",
                   "-o", tmp_path / "q.onnx"), "--exclude-op-types", "no Conv nodes")
    _usage(_invoke(fp32_onnx, "--int8", "--calib", sst2_slice, "--adapter-precision", "fp16",
                   "-o", tmp_path / "q.onnx"), "--adapter-precision", "'fp16'")
    _fails(_invoke(tmp_path / "missing.onnx", "--fp16", "--val", sst2_slice, "-o", tmp_path / "q.onnx"),
           "no such ONNX file")
    usage = _invoke(fp32_onnx, "--calib", sst2_slice, "-o", tmp_path / "q.onnx")
    assert usage.exit_code == 2 and "--int8 or --fp16" in usage.output
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("args, flag, needle", [
    (["--max-accuracy-drop", "nan"], "--max-accuracy-drop", "finite"),
    (["--max-accuracy-drop", "inf"], "--max-accuracy-drop", "finite"),
    (["--max-accuracy-drop", "-1"], "--max-accuracy-drop", ">= 0"),
    (["--min-sqnr", "nan"], "--min-sqnr", "finite"),
    (["--calib-size", "0"], "--calib-size", ">= 1"),
    (["--val-size", "-3"], "--val-size", ">= 1"),
    (["--batch-size", "0"], "--batch-size", ">= 1"),
    (["--max-length", "0"], "--max-length", ">= 1"),
])
def test_bad_settings_are_usage_errors(tmp_path, args, flag, needle):
    model = _tiny_float_onnx(tmp_path / "tiny.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 8), np.float32))
    result = _invoke(model, "--int8", "--calib", tmp_path / "calib.npz", *args, "-o", tmp_path / "q.onnx")
    _usage(result, flag, needle)
    assert not (tmp_path / "q.onnx").exists()


def test_min_sqnr_is_for_int8(tmp_path):
    model = _tiny_float_onnx(tmp_path / "tiny.onnx")
    np.savez(tmp_path / "val.npz", x=np.zeros((4, 8), np.float32))
    _usage(_invoke(model, "--fp16", "--val", tmp_path / "val.npz", "--min-sqnr", 20, "-o", tmp_path / "q.onnx"),
           "--min-sqnr", "int8")


def test_config_errors_name_the_field(tmp_path):
    from lily_deploy.core.config import ConfigError
    from lily_deploy.precision import QuantizeConfig, quantize

    model = _tiny_float_onnx(tmp_path / "tiny.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 8), np.float32))
    base = dict(model_path=model, output=tmp_path / "q.onnx", calib=tmp_path / "calib.npz")
    for bad, field in [({"max_accuracy_drop": float("nan")}, "max_accuracy_drop"),
                       ({"max_accuracy_drop": float("inf")}, "max_accuracy_drop"),
                       ({"min_sqnr": float("-inf")}, "min_sqnr"),
                       ({"precision": "int2"}, "precision"),
                       ({"precision": "int4", "block_size": 48}, "block_size"),
                       ({"precision": "int4", "int4_target": "tensorrt", "int4_method": "hqq"}, "int4_method"),
                       ({"adapter_precision": "fp16"}, "adapter_precision"),
                       ({"calib_method": "mse"}, "calib_method"),
                       ({"int8_target": "cpu"}, "int8_target"),
                       ({"calib_size": 0}, "calib_size"),
                       ({"batch_size": 1.5}, "batch_size"),
                       ({"calib": None}, "calib"),
                       ({"precision": "fp16", "val": tmp_path / "calib.npz", "min_sqnr": 20.0}, "min_sqnr")]:
        with pytest.raises(ConfigError) as err:
            QuantizeConfig(**{**base, **bad})
        assert err.value.field == field and str(err.value).startswith(f"{field}: ")
        assert "--" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # the same through the stage's keywords
        quantize(**base, max_accuracy_drop=float("nan"))
    assert err.value.field == "max_accuracy_drop"
    # a node name the graph lacks is known only once the graph is read: still a ConfigError on the field
    with pytest.raises(ConfigError, match="no node named 'nope'") as err:
        quantize(QuantizeConfig(**base, exclude_nodes="nope", cache_dir=None, progress=False))
    assert err.value.field == "exclude_nodes"
    config = QuantizeConfig(**base)
    assert config.adapter == "int8" and config.replace(adapter_precision="fp32").adapter == "fp32"
    assert config.cache_dir is not None and QuantizeConfig.resolve(config, cache_dir=None).cache_dir is None
    assert not (tmp_path / "q.onnx").exists()


def test_output_that_is_an_input_is_refused(tmp_path):
    model = _tiny_float_onnx(tmp_path / "tiny.onnx")
    external = onnx.load(str(model))
    onnx.save(external, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    np.savez(tmp_path / "calib.npz", x=np.zeros((8, 8), np.float32))
    (tmp_path / "images").mkdir()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    common = ["--int8", "--calib", tmp_path / "calib.npz", "--no-cache"]
    _fails(_invoke(model, *common, "-o", model), "is the input ONNX model")
    _fails(_invoke(tmp_path / "ext.onnx", *common, "-o", tmp_path / "ext.onnx.data"), "ext.onnx.data", "ext.onnx")
    _fails(_invoke(model, *common, "-o", tmp_path / "calib.npz"), "is the input calibration data")
    _fails(_invoke(model, *common, "--val", tmp_path / "images", "-o", tmp_path / "images" / "q.onnx"),
           "lies inside the input validation data")
    _fails(_invoke(model, "--int8", "--calib", tmp_path / "images", "-o", tmp_path / "images" / "q.onnx"),
           "lies inside the input calibration data")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not list((tmp_path / "images").iterdir())


@pytest.mark.parametrize("how", ["--calib", "--val"])
@pytest.mark.parametrize("content, needle", [
    ('{"text": "a fine film", "label": 1}\n[1, 2]\n', "line 2"),
    ('"just a string"\n', "line 1"),
])
def test_jsonl_lines_that_are_not_objects(fp32_onnx, tmp_path, how, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    mode = ["--int8", "--calib", bad] if how == "--calib" else ["--fp16", "--val", bad]
    result = _invoke(fp32_onnx, *mode, "--no-cache", "-o", tmp_path / "q.onnx")
    _fails(result, "bad.jsonl", needle)
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("how", ["--calib", "--val"])
@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_field_over_the_csv_size_limit(fp32_onnx, tmp_path, how, suffix):
    import csv

    sep = "," if suffix == ".csv" else "\t"
    bad = tmp_path / f"big{suffix}"
    bad.write_text(f"text{sep}label\nfine{sep}1\n{'x' * (csv.field_size_limit() + 10)}{sep}0\n")
    mode = ["--int8", "--calib", bad] if how == "--calib" else ["--fp16", "--val", bad]
    result = _invoke(fp32_onnx, *mode, "--no-cache", "-o", tmp_path / "q.onnx")
    _fails(result, bad.name, "line 3")
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "q.onnx").exists()


def test_accuracy_budget_failure_writes_nothing(tmp_path):
    """A budget of 0 disagreement on a graph whose int8 logits tie-break differently fails with exit 1."""
    model = _tiny_float_onnx(tmp_path / "tiny.onnx", classes=3)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 8)).astype(np.float32) * 0.05  # near-tied logits: int8 flips some
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 8)).astype(np.float32) * 10)
    np.savez(tmp_path / "val.npz", x=x)
    result = _invoke(model, "--int8", "--calib", tmp_path / "calib.npz", "--val", tmp_path / "val.npz",
                     "--max-accuracy-drop", 0, "--no-cache", "-o", tmp_path / "q.onnx")
    _fails(result, "validation failed", "not written")
    assert not (tmp_path / "q.onnx").exists()
    assert not list(tmp_path.glob(".q.onnx*"))
