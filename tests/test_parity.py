"""``parity``: torch reference vs ONNX (fp32 / fp16 / int8) candidates, tolerances, batch invariance, bad input.

Built on the tiny random RoBERTa with Lily (conftest) so exports stay fast; the MiniLM run with
real data is ``benchmarks/ci_parity.py``.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import SENTENCES, data_file
from lily_deploy.cli import cli
from lily_deploy.core.config import ConfigError
from lily_deploy.core.errors import LilyDeployError
from lily_deploy.parity_check import (DEFAULT_TOLERANCES, ParityConfig, detect_precision, make_tolerances, metric_value,
                                      output_stats, run_parity)

TEXTS = SENTENCES + ["not bad at all", "it 's a mess", "one of the year 's most intriguing explorations",
                     "the film is strictly routine", "a masterpiece of quiet, patient storytelling"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tsv(path, rows, header="sentence\tlabel"):
    path.write_text(header + "\n" + "\n".join("\t".join(map(str, r)) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return _tsv(tmp_path_factory.mktemp("data") / "dev.tsv", [(t, i % 2) for i, t in enumerate(TEXTS)])


@pytest.fixture(scope="module")
def exported(tiny_roberta_adapter, tmp_path_factory):
    """fp32 exports of the tiny RoBERTa+Lily in sample and batch routing, plus FP16 and INT8 graphs."""
    from lily_deploy.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("parity")
    paths = {}
    for routing in ("sample", "batch"):
        paths[routing] = out / f"lily_{routing}.onnx"
        export_onnx(source=tiny_roberta_adapter, output=paths[routing], routing=routing)
    paths["fp16"] = out / "lily.fp16.onnx"
    paths["int8"] = out / "lily.int8.onnx"
    _fp16(paths["sample"], paths["fp16"])
    _int8(paths["sample"], paths["int8"], tiny_roberta_adapter)
    return paths


def _fp16(src, dst):
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    del model.metadata_props[:]  # precision must then be read off the graph
    onnx.save(model, str(dst))


def _int8(src, dst, adapter):
    """Q/DQ INT8 in the form facts.md records for TensorRT (symmetric, per-channel, float biases)."""
    import onnx.inliner
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from lily_deploy.onnx_export import open_model

    model = onnx.inliner.inline_local_functions(onnx.load(str(src)))
    del model.functions[:]
    inlined = dst.with_name("inlined.onnx")
    onnx.save(model, str(inlined))
    tok = open_model(adapter).tokenizer

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{k: v for k, v in tok([t], return_tensors="np").items()} for t in TEXTS])

        def get_next(self):
            return next(self.rows, None)

    quantize_static(str(inlined), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})


def _tiny_onnx(path, inputs=("input_ids", "attention_mask"), output="logits", classes=2, batch="batch",
               seq="sequence", meta=None, input_type=TensorProto.INT64, vocab=30522):
    """A small hand-made graph: mean of a 2-column embedding over the tokens -> [batch, classes]."""
    emb = helper.make_tensor("emb", TensorProto.FLOAT, [vocab, classes],
                             np.random.default_rng(0).standard_normal((vocab, classes)).astype(np.float32).ravel())
    ids = inputs[0] if input_type == TensorProto.INT64 else "ids"  # int64 ids index the embedding directly
    nodes = [helper.make_node("Cast", [inputs[0]], ["ids"], to=TensorProto.INT64)] if ids == "ids" else []
    nodes += [helper.make_node("Gather", ["emb", ids], ["g"]),
              helper.make_node("ReduceMean", ["g", "axes"], [output], keepdims=0)]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(n, input_type, [batch, seq])
                                              for n in inputs],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, classes])],
                              [emb, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    for k, v in (meta or {}).items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(model, str(path))
    return path


def _cli(*args):
    return CliRunner().invoke(cli, ["parity", "--threads", "1", *map(str, args)])


def _assert_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "error: " in result.output
    for n in needles:
        assert n in result.output, result.output


# ------------------------------------------------------------------------------------ the comparison

def test_fp32_sample_and_batch_routing(tiny_roberta_adapter, exported, labelled):
    report = run_parity(reference=tiny_roberta_adapter, candidates=[exported["sample"], exported["batch"]],
                        data=labelled, batch_sizes=(1, 4), progress=False)
    assert report and report.passed
    sample, batch = report.candidates
    assert sample.routing == "sample" and batch.routing == "batch"
    for c in (sample, batch):
        assert c and c.status == "PASSED" and c.precision == "fp32"
        assert [b.batch_size for b in c.batches] == [1, 4]
        for b in c.batches:
            assert b.agreement == 100.0
            assert b.metric == b.reference_metric and b.metric_delta == 0.0
            assert b.outputs["logits"]["max_abs"] <= 1e-4
            assert b.outputs["logits"]["cosine_min"] > 0.9999
        assert {ch.name for ch in c.checks} >= {"logits max abs", "top-1 agreement", "accuracy drop",
                                                 "batch invariance"}
    # sample routing: batch invariance is required and holds, in torch and in the ONNX
    assert sample.invariance.required and sample.invariance.passed
    assert sample.invariance.max_abs <= 1e-6 and sample.invariance.reference_max_abs <= 1e-6
    # batch routing: a finding, not a failure, and the finding is real (outputs depend on the batch)
    assert not batch.invariance.required and batch.invariance.passed is None
    assert batch.invariance.reference_max_abs > 1e-7
    assert abs(batch.invariance.max_abs - batch.invariance.reference_max_abs) < 1e-6
    assert next(ch for ch in batch.checks if ch.name == "batch invariance").passed is None
    assert report.final_line().startswith("PASSED | parity: 2 passed of 2 candidates")


def test_fp16_and_int8_judged_on_agreement_and_metric(tiny_roberta_adapter, exported, labelled):
    report = run_parity(reference=tiny_roberta_adapter, candidates=[exported["fp16"], exported["int8"]],
                        data=labelled, batch_sizes=(4,), progress=False)
    fp16, int8 = report.candidates
    assert fp16.precision == "fp16" and int8.precision == "int8"
    assert "graph" in " ".join(int8.notes)  # decided from the Q/DQ nodes
    for c, tol in ((fp16, DEFAULT_TOLERANCES["fp16"]), (int8, DEFAULT_TOLERANCES["int8"])):
        abs_check = next(ch for ch in c.checks if ch.name == "logits max abs")
        assert abs_check.passed is None and abs_check.limit is None  # reported, not judged
        agree = next(ch for ch in c.checks if ch.name == "top-1 agreement")
        assert agree.limit == tol.min_agreement
        assert next(ch for ch in c.checks if ch.name == "accuracy drop").limit == tol.max_metric_drop
        assert c.invariance.required
    assert int8.batches[0].outputs["logits"]["max_abs"] > 0  # int8 really differs from fp32
    # an explicit int8 atol makes the abs difference a judged check, and an impossible one fails
    strict = run_parity(reference=tiny_roberta_adapter, candidates=[exported["int8"]], data=labelled,
                        batch_sizes=(4,), progress=False, tolerances=make_tolerances(atol={"int8:logits": 1e-9}))
    assert not strict and strict.candidates[0].status == "FAILED"
    assert "atol 1e-09" in strict.candidates[0].reason


def test_precision_from_metadata_beats_the_graph(exported, tmp_path):
    model = onnx.load(str(exported["sample"]))
    assert detect_precision(model)[0] == "fp32"
    p = model.metadata_props.add()
    p.key, p.value = "lily_deploy.precision", "int8"
    assert detect_precision(model) == ("int8", "metadata lily_deploy.precision")
    assert detect_precision(onnx.load(str(exported["int8"])))[0] == "int8"
    assert detect_precision(onnx.load(str(exported["fp16"])))[0] == "fp16"


def test_torch_candidate_and_generated_inputs(tiny_roberta_adapter, exported, tmp_path):
    """A deploy checkpoint runs in torch as a candidate; no --data means generated inputs, metric agreement."""
    from lily_deploy.core.deploy import load_model, save_deploy

    ckpt = save_deploy(load_model(tiny_roberta_adapter, mode="sample"), tmp_path / "ckpt")
    report = run_parity(reference=tiny_roberta_adapter, candidates=[ckpt, exported["sample"]], num_generated=12,
                        batch_sizes=(3,), progress=False)
    assert report, report.table()
    assert report.metric == "agreement" and report.data["generated"] and report.data["rows"] == 12
    torch_c = report.candidates[0]
    assert torch_c.kind == "torch" and torch_c.routing == "sample"
    assert torch_c.batches[0].outputs["logits"]["max_abs"] == 0.0


def test_a_different_model_fails_and_exits_1(tiny_roberta_dir, exported, labelled, tmp_path):
    from conftest import make_lily_adapter

    other = make_lily_adapter(str(tiny_roberta_dir), tmp_path / "other", ["query", "value"], num_labels=2,
                              num_b=4, stride=2, scale=1.0, seed=7)
    result = _cli("--reference", other, "--candidate", exported["sample"], "--data", labelled,
                  "--batch-sizes", "4", "--report-dir", tmp_path / "rep")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("FAILED | parity: 0 passed, 1 failed of 1 candidates; lily_sample.onnx: logits: max |d|")
    data = json.loads((tmp_path / "rep" / "parity.json").read_text())
    assert data["schema_version"] == 1 and data["kind"] == "parity" and data["passed"] is False
    assert data["candidates"][0]["status"] == "FAILED"


def test_cli_passes_and_writes_reports(tiny_roberta_adapter, exported, tmp_path):
    sst2 = data_file("sst2", "dev.tsv")
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--candidate",
                  exported["int8"], "--data", sst2, "--limit", 40, "--batch-sizes", "1,8", "--report-dir",
                  tmp_path / "rep")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("PASSED | parity: 2 passed of 2 candidates")
    rep = tmp_path / "rep"
    data = json.loads((rep / "parity.json").read_text())
    assert data["data"]["rows"] == 40 and data["metric"] == "accuracy"
    assert [c["precision"] for c in data["candidates"]] == ["fp32", "int8"]
    assert set(data["candidates"][0]) >= {"name", "status", "batches", "invariance", "checks", "tolerance"}
    assert (rep / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (rep / "parity.md").read_text()
    assert md.startswith("# lily-deploy parity: PASSED") and "| lily_sample.onnx | fp32 | sample | 1 |" in md


def test_atol_flag_tightens_fp32(tiny_roberta_adapter, exported, labelled):
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--data", labelled,
                  "--batch-sizes", "4", "--atol", "logits:0")
    assert result.exit_code == 1  # onnxruntime and torch differ in the last bits
    assert "logits: max |d|" in result.output and "> atol 0" in result.output


# ------------------------------------------------------------------------------------ bad input

def test_candidate_inputs_or_outputs_do_not_match(tiny_roberta_adapter, labelled, tmp_path):
    wrong_in = _tiny_onnx(tmp_path / "pixels.onnx", inputs=("input_ids", "pixel_mask"))
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", wrong_in, "--data", labelled),
                  f"--candidate {wrong_in}: needs input 'pixel_mask'", "reference inputs: input_ids, attention_mask")
    wrong_out = _tiny_onnx(tmp_path / "scores.onnx", output="scores")
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", wrong_out, "--data", labelled),
                  f"--candidate {wrong_out}: has no output 'logits' (its outputs: scores)")
    three = _tiny_onnx(tmp_path / "three.onnx", classes=3)
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", three, "--data", labelled),
                  "output logits has 3 classes, the reference has 2")
    labels = _tiny_onnx(tmp_path / "labels.onnx", meta={"lily_deploy.labels": json.dumps(["neg", "pos"])})
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", labels, "--data", labelled),
                  "labels neg, pos differ from the reference's 0, 1")
    floats = _tiny_onnx(tmp_path / "floats.onnx", input_type=TensorProto.FLOAT)
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", floats, "--data", labelled),
                  "input 'input_ids' is float32")


def test_matching_hand_made_graph_runs_and_fails_on_numbers(tiny_roberta_adapter, labelled, tmp_path):
    """Same inputs and outputs, different model: a comparison result (FAILED), not an error."""
    tiny = _tiny_onnx(tmp_path / "tiny.onnx")
    report = run_parity(reference=tiny_roberta_adapter, candidates=[tiny], data=labelled, batch_sizes=(4,),
                        progress=False)
    assert not report and report.candidates[0].status == "FAILED"
    assert "takes no token_type_ids" in " ".join(report.candidates[0].notes)


def test_label_the_model_does_not_know(tiny_roberta_adapter, exported, tmp_path):
    bad = _tsv(tmp_path / "bad.tsv", [("fine", 0), ("meh", "neutral"), ("great", 1)])
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--data", bad),
                  f"--data {bad}: row 2 has label 'neutral', which the model does not know (labels: 0, 1)")


# the header of a serialized TensorRT-RTX plan (what build-trt writes; a TensorRT plan starts with b"ftrt"),
# for tests that need a file parity takes for an engine but never runs
PLAN_HEADER = b"vtrt" + bytes(60)


@pytest.fixture(scope="module")
def rtx_engine(tmp_path_factory):
    """A real engine of the small hand-made graph, built ahead of time with TensorRT for RTX (no GPU needed)."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed (pip install tensorrt-rtx-cu12)")
    from lily_deploy.trt_build import build_engine

    out = tmp_path_factory.mktemp("engine")
    build_engine(onnx_path=_tiny_onnx(out / "tiny.onnx"), output=out / "tiny.plan", backend="tensorrt-rtx",
                 compute_capabilities=["sm89"], progress=False)
    return out / "tiny.plan"


def test_engine_without_gpu_is_skipped_not_failed(tiny_roberta_adapter, exported, labelled, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the engine would run (see test_build_trt's GPU tests)")
    plan = tmp_path / "model.plan"
    plan.write_bytes(PLAN_HEADER)
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--candidate", plan,
                  "--data", labelled, "--batch-sizes", "4")
    assert result.exit_code == 0, result.output
    assert "model.plan: SKIPPED -- no CUDA GPU here" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("PASSED | parity: 1 passed, 1 skipped of 2 candidates")
    assert "(skipped: model.plan)" in last  # PASSED for what was compared, and it names what was not


def test_nothing_compared_is_not_passed(tiny_roberta_adapter, rtx_engine, labelled):
    """Issue #12: a run whose only candidate is skipped used to print PASSED and exit 0."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the engine is not skipped")
    from lily_deploy.runtime.tensorrt import check_engine_header

    assert check_engine_header(rtx_engine, "engine") == "TensorRT-RTX"
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", rtx_engine, "--data", labelled)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("NOTHING COMPARED (1 skipped) | parity: 0 passed, 1 skipped of 1 candidates")
    assert "tiny.plan skipped: no CUDA GPU here" in last and "--allow-skips" in last and "PASSED" not in last
    allowed = _cli("--reference", tiny_roberta_adapter, "--candidate", rtx_engine, "--data", labelled,
                   "--allow-skips", "--json")
    assert allowed.exit_code == 0, allowed.output
    last = allowed.output.strip().splitlines()[-1]
    assert last.startswith("NOTHING COMPARED (1 skipped) | parity:") and "PASSED" not in last
    data = json.loads(allowed.stdout)
    assert data["passed"] is False and data["verdict"] == "NOTHING COMPARED" and data["allow_skips"] is True
    # the Python API: falsy unless skips are allowed, and never `passed`
    report = run_parity(reference=tiny_roberta_adapter, candidates=[rtx_engine], data=labelled, progress=False)
    assert not report and not report.passed and report.verdict == "NOTHING COMPARED"
    report = run_parity(reference=tiny_roberta_adapter, candidates=[rtx_engine], data=labelled, progress=False,
                        allow_skips=True)
    assert report and not report.passed
    assert report.markdown().startswith("# lily-deploy parity: NOTHING COMPARED")


def test_a_file_that_is_no_engine_is_an_error_not_a_skip(tiny_roberta_adapter, exported, labelled, tmp_path):
    junk = tmp_path / "random.plan"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    for args in (("--candidate", junk), ("--candidate", exported["sample"], "--candidate", junk)):
        result = _cli("--reference", tiny_roberta_adapter, *args, "--data", labelled)
        _assert_error(result, f"--candidate {junk}: not a TensorRT engine")
        assert len(result.output.strip().splitlines()) == 1
    empty = tmp_path / "empty.engine"
    empty.write_bytes(b"")
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", empty),
                  f"--candidate {empty}: not a TensorRT engine (it starts with nothing")


def test_engine_report_with_other_io_is_refused(tiny_roberta_adapter, labelled, tmp_path):
    plan = tmp_path / "vit.plan"
    plan.write_bytes(PLAN_HEADER)
    (tmp_path / "vit.plan.json").write_text(json.dumps({
        "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": [-1, 3, 32, 32]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 3], "onnx_shape": ["batch", 3]}],
        "precision": {"label": "fp32"}}))
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", plan, "--data", labelled),
                  f"--candidate {plan}: needs input 'pixel_values'")


def test_metric_that_needs_labels_on_unlabelled_data(tiny_roberta_adapter, exported, tmp_path):
    texts = _tsv(tmp_path / "texts.tsv", [(t,) for t in TEXTS], header="sentence")
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--data", texts,
                       "--metric", "accuracy"),
                  "--metric accuracy needs labels", "has no label column", "--metric agreement")
    # a cross-field rule of the config: a usage error naming the flag (it was exit 1 with the flag in the message)
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--metric", "f1")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'--metric'" in result.output and "f1 needs labelled data" in result.output
    # without --metric, unlabelled data is compared on agreement
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--data", texts,
                  "--batch-sizes", "4")
    assert result.exit_code == 0, result.output
    assert "metric agreement" in result.output


def test_routing_conflict_and_other_mistakes(tiny_roberta_adapter, exported, labelled, tmp_path):
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", exported["batch"], "--data", labelled,
                       "--routing", "sample"),
                  f"--candidate {exported['batch']}: was exported with --routing batch")
    _assert_error(_cli("--reference", exported["sample"], "--candidate", exported["batch"]),
                  "the reference is the torch model")
    missing = tmp_path / "nope.onnx"
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", missing),
                  f"--candidate {missing} does not exist")
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", junk), f"--candidate {junk}:")
    other = tmp_path / "model.bin"
    shutil.copy(exported["sample"], other)
    _assert_error(_cli("--reference", tiny_roberta_adapter, "--candidate", other), "not an .onnx file")
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--atol", "int9:logits:1")
    assert result.exit_code == 2 and "Traceback" not in result.output  # a usage error (was exit 1)
    assert "'--atol'" in result.output and "int9:logits: 'int9' is not a precision" in result.output
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--batch-sizes", "0")
    assert result.exit_code == 2 and "--batch-sizes" in result.output


def test_token_ids_outside_the_vocabulary(tiny_roberta_dir, tiny_roberta_adapter, labelled, tmp_path):
    """Ids a model cannot embed are one line naming the file, not an IndexError or an onnxruntime traceback."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    small = tmp_path / "small-vocab"
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=0, max_position_embeddings=258, num_labels=2)
    RobertaForSequenceClassification(cfg).save_pretrained(str(small))
    AutoTokenizer.from_pretrained(str(tiny_roberta_dir)).save_pretrained(str(small))  # ids up to 30521
    candidate = _tiny_onnx(tmp_path / "any.onnx")
    result = _cli("--reference", small, "--candidate", candidate, "--data", labelled)
    _assert_error(result, f"--data {labelled}: row 2 encodes to input_ids", "outside the reference model's range 0..99")
    assert len(result.output.strip().splitlines()) == 1
    # a candidate whose embedding is smaller than the reference's (exported from another model)
    narrow = _tiny_onnx(tmp_path / "narrow.onnx", vocab=1000)
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", narrow, "--data", labelled)
    _assert_error(result, f"--candidate {narrow}: embeds token ids 0..999, but the inputs", "have token id")


def test_reports_never_overwrite_an_input(tiny_roberta_adapter, exported, labelled, tmp_path):
    before = labelled.read_bytes()
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--data", labelled,
                  "--report-dir", tiny_roberta_adapter)
    _assert_error(result, f"--report-dir {tiny_roberta_adapter}: is the input reference")
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--data", labelled,
                  "--report-dir", tiny_roberta_adapter / "rep")
    _assert_error(result, "lies inside the input reference")
    # a data file where the report would go: parity.json in the report folder
    rep = tmp_path / "rep"
    rep.mkdir()
    rows = rep / "parity.json"
    rows.write_text("".join(json.dumps({"sentence": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS)))
    result = _cli("--reference", tiny_roberta_adapter, "--candidate", exported["sample"], "--data", rows,
                  "--report-dir", rep)
    _assert_error(result, f"--report-dir {rows}: is the input data")
    assert labelled.read_bytes() == before and not (tiny_roberta_adapter / "rep").exists()
    assert sorted(p.name for p in rep.iterdir()) == ["parity.json"]


def test_config_is_validated_naming_the_field_or_flag(exported):
    cand = [exported["sample"]]
    for fields, name in ((dict(candidates=[]), "candidates"), (dict(batch_sizes=[0]), "batch_sizes"),
                         (dict(batch_sizes=[]), "batch_sizes"), (dict(threads=0), "threads"),
                         (dict(limit=0), "limit"), (dict(max_length=0), "max_length"),
                         (dict(num_generated=0), "num_generated"), (dict(invariance_samples=-1), "invariance_samples"),
                         (dict(metric="top5"), "metric"), (dict(routing="static"), "routing"),
                         (dict(metric="mcc"), "metric"), (dict(batch_sizes=[1.5]), "batch_sizes"),
                         (dict(tolerances={}), "tolerances")):
        with pytest.raises(ConfigError) as info:
            ParityConfig(**{"reference": "minilm", "candidates": cand, **fields})
        assert info.value.field == name and str(info.value).startswith(f"{name}: "), str(info.value)
        assert "--" not in str(info.value)
        with pytest.raises(ConfigError):  # the stage refuses the same fields before loading anything
            run_parity(reference="minilm", **{"candidates": cand, **fields})
    bad = make_tolerances()
    bad["fp16"].invariance_atol = float("nan")
    with pytest.raises(ConfigError, match="tolerances: must be a finite number"):
        ParityConfig(reference="minilm", candidates=cand, tolerances=bad)
    for kwargs, name in ((dict(atol={"*": float("nan")}), "atol"), (dict(atol={"logits": -1}), "atol"),
                         (dict(max_metric_drop={"int8": float("inf")}), "max_metric_drop"),
                         (dict(stat="median"), "stat")):
        with pytest.raises(ConfigError) as info:
            make_tolerances(**kwargs)
        assert info.value.field == name
    config = ParityConfig(reference="minilm", candidates=exported["sample"], batch_sizes=[4])
    assert config.candidates == (exported["sample"],) and config.batch_sizes == (4,)
    assert config.replace(allow_skips=True).allow_skips and set(config.tolerances) == set(DEFAULT_TOLERANCES)


@pytest.mark.parametrize("args, flag", [(("--threads", "0"), "--threads"), (("--limit", "0"), "--limit"),
                                        (("--max-length", "0"), "--max-length"),
                                        (("--num-generated", "0"), "--num-generated"),
                                        (("--invariance-samples", "-1"), "--invariance-samples"),
                                        (("--min-agreement", "120"), "--min-agreement"),
                                        (("--atol", "nan"), "--atol"),
                                        (("--max-metric-drop", "int9:1"), "--max-metric-drop")])
def test_cli_usage_errors_exit_2_naming_the_flag(exported, args, flag):
    result = CliRunner().invoke(cli, ["parity", "--reference", "minilm", "--candidate", str(exported["sample"]),
                                      *args])
    assert result.exit_code == 2, result.output
    assert f"'{flag}'" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------ pieces

def test_metrics_by_hand():
    labels = np.array([1, 1, 0, 0, 1, 0])
    preds = np.array([1, 0, 0, 1, 1, 0])
    assert metric_value("accuracy", preds, labels, preds, 2) == pytest.approx(100 * 4 / 6)
    # class 1: tp 2, fp 1, fn 1 -> F1 = 4 / 6
    assert metric_value("f1", preds, labels, preds, 2) == pytest.approx(100 * 4 / 6)
    # tp 2 tn 2 fp 1 fn 1: (4 - 1) / sqrt(3 * 3 * 3 * 3)
    assert metric_value("mcc", preds, labels, preds, 2) == pytest.approx(100 * 3 / 9)
    assert metric_value("agreement", preds, None, labels, 2) == pytest.approx(100 * 4 / 6)
    stats = output_stats(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 2.5], [3.0, 4.0]]))
    assert stats["max_abs"] == 0.5 and stats["mean_abs"] == 0.125 and stats["cosine_min"] < 1.0


def test_tolerance_precedence():
    tol = make_tolerances(atol={"*": 1e-3, "int8": 0.1, "logits": 1e-2, "int8:logits": 0.5},
                          min_agreement={"*": 90, "fp32": 99.5}, max_metric_drop={"int8": 2})
    assert tol["fp32"].atol_for("logits") == 1e-2 and tol["fp32"].atol_for("other") == 1e-3
    assert tol["int8"].atol_for("logits") == 0.5 and tol["int8"].atol_for("other") == 0.1
    assert tol["fp32"].min_agreement == 99.5 and tol["fp16"].min_agreement == 90
    assert tol["int8"].max_metric_drop == 2
    assert tol["fp16"].max_metric_drop == DEFAULT_TOLERANCES["fp16"].max_metric_drop
    with pytest.raises(LilyDeployError, match="min_agreement"):  # the argument, not the CLI flag
        make_tolerances(min_agreement={"*": 120})
    with pytest.raises(LilyDeployError, match="'logits' is not a precision"):
        make_tolerances(max_metric_drop={"logits": 1})
