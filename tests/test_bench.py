"""``bench``: interleaved latency across torch and onnxruntime, base ratios, reports, bad input."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from lily_deploy.benchmark import BenchConfig, parse_model, run_bench
from lily_deploy.runtime.tensorrt import check_engine_header
from lily_deploy.cli import cli
from lily_deploy.core.config import ConfigError
from lily_deploy.core.errors import LilyDeployError

FAST = dict(batch_sizes=(1, 2), seq_lens=(8, 16), warmup=1, iters=4, threads=1, progress=False, memory=False)


@pytest.fixture(scope="module")
def lily_onnx(tiny_roberta_adapter, tmp_path_factory):
    from lily_deploy.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("bench") / "lily.onnx"
    export_onnx(source=tiny_roberta_adapter, output=path, routing="sample")
    return path


def _fixed_onnx(path, batch=1, seq=8):
    """A hand-made graph with fixed input shapes [batch, seq] (what a static export looks like)."""
    emb = helper.make_tensor("emb", TensorProto.FLOAT, [30522, 2],
                             np.random.default_rng(0).standard_normal((30522, 2)).astype(np.float32).ravel())
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["g"]),
             helper.make_node("ReduceMean", ["g", "axes"], ["logits"], keepdims=0)]
    graph = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                              [batch, seq])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])], [emb, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_interleaved_run_with_base_ratios(tiny_roberta_dir, tiny_roberta_adapter, lily_onnx):
    report = run_bench(models=[f"lily={tiny_roberta_adapter}", f"lily={lily_onnx}"], base=[f"base={tiny_roberta_dir}"],
                       **FAST)
    pairs = {(r.model, r.backend) for r in report.results}
    assert pairs == {("base", "torch"), ("lily", "torch"), ("lily", "onnxruntime")}
    assert len(report.results) == 3 * 4  # every runner at every batch size and sequence length
    for r in report.results:
        assert r.iters == 4
        assert 0 < r.min_ms <= r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.throughput == pytest.approx(r.batch_size * 1000.0 / r.p50_ms)
        assert r.weights_mib > 0 and r.peak_rss_mib is None  # memory=False: no fresh-process probe
    lily_torch = [r for r in report.results if (r.model, r.backend) == ("lily", "torch")]
    base_torch = {(r.batch_size, r.seq_len): r for r in report.results if r.model == "base"}
    for r in lily_torch:
        assert r.base == "base"
        assert r.overhead_vs_base == pytest.approx(r.p50_ms / base_torch[r.batch_size, r.seq_len].p50_ms, rel=1e-3)
    # no onnxruntime base was given: those rows carry no ratio rather than a cross-backend one
    assert all(r.overhead_vs_base is None for r in report.results if r.backend == "onnxruntime")
    assert report.settings["threads"] == 1 and report.settings["seq_lens"] == [8, 16]
    assert "lily" in report.table() and "x base" in report.markdown()


def test_cli_reports_and_fixed_shapes(lily_onnx, tmp_path):
    fixed = _fixed_onnx(tmp_path / "fixed.onnx", batch=1, seq=8)
    result = CliRunner().invoke(cli, ["bench", str(lily_onnx), str(fixed), "--batch-sizes", "1,2", "--seq-lens",
                                      "8", "--warmup", "0", "--iters", "3", "--threads", "1", "--base", "fixed",
                                      "--report-dir", str(tmp_path / "rep"), "--markdown"])
    assert result.exit_code == 0, result.output
    assert "| model | backend | batch | seq |" in result.output
    data = json.loads((tmp_path / "rep" / "bench.json").read_text())
    assert data["schema_version"] == 1 and data["kind"] == "bench"
    rows = {(r["model"], r["batch_size"]) for r in data["results"]}
    assert rows == {("lily", 1), ("lily", 2), ("fixed", 1)}
    skipped = [s for s in data["skipped"] if s["model"] == "fixed"]
    assert skipped and skipped[0]["batch_size"] == 2 and "fixed batch of 1" in skipped[0]["reason"]
    lily1 = next(r for r in data["results"] if r["model"] == "lily" and r["batch_size"] == 1)
    assert lily1["base"] == "fixed" and lily1["overhead_vs_base"] > 0
    # peak memory from a fresh process holding only that model: more than its weights, and measured
    assert lily1["peak_rss_mib"] > lily1["weights_mib"] > 0
    assert not data["notes"]
    assert (tmp_path / "rep" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "rep" / "bench.md").read_text().count("\n|") >= 3


def test_engine_without_gpu_is_skipped(lily_onnx, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the engine would run")
    plan = tmp_path / "lily.plan"
    plan.write_bytes(b"vtrt" + bytes(60))  # a TensorRT-RTX plan's header: taken for an engine, never run here
    report = run_bench(models=[str(lily_onnx), str(plan)], **{**FAST, "batch_sizes": (1,), "seq_lens": (8,)})
    assert {r.model for r in report.results} == {"lily"}
    assert report.skipped == [{"model": "lily", "backend": "tensorrt", "reason": "no CUDA GPU here"}]
    assert "skipped: lily (tensorrt): no CUDA GPU here" in report.table()


def test_bad_input(lily_onnx, tmp_path):
    run = lambda *a: CliRunner().invoke(cli, ["bench", *map(str, a)])  # noqa: E731
    r = run()  # a usage error of the config now (exit 2 naming MODEL; it was exit 1)
    assert r.exit_code == 2 and "no model given" in r.output and "'MODEL'" in r.output and "Traceback" not in r.output
    r = run(tmp_path / "missing.onnx")
    assert r.exit_code == 1 and f"error: model {tmp_path / 'missing.onnx'}: file does not exist" in r.output
    r = run(lily_onnx, "--backends", "torch,cuda-magic")
    assert r.exit_code == 2 and "cuda-magic" in r.output
    r = run(lily_onnx, "--backends", "torch")
    assert r.exit_code == 1 and "nothing to measure" in r.output
    r = run(lily_onnx, "--iters", "0", "--threads", "1")  # exit 2 naming the flag (was exit 1)
    assert r.exit_code == 2 and "'--iters'" in r.output and "must be >= 1, got 0" in r.output
    r = run(lily_onnx, "--seq-lens", "0")
    assert r.exit_code == 2
    with pytest.raises(LilyDeployError, match="expected PATH or LABEL=PATH"):
        parse_model("=x.onnx")
    with pytest.raises(LilyDeployError, match="names two models of the same kind"):
        run_bench(models=[f"a={lily_onnx}", f"a={lily_onnx}"], **FAST)


def test_files_that_are_no_model_are_one_line(lily_onnx, tmp_path):
    fast = ["--batch-sizes", "1", "--seq-lens", "8", "--iters", "1", "--warmup", "0"]
    run = lambda *a: CliRunner().invoke(cli, ["bench", *map(str, a), *fast])  # noqa: E731
    rng = np.random.default_rng(0)
    junk = tmp_path / "random.onnx"
    junk.write_bytes(rng.bytes(4096))
    plan = tmp_path / "random.plan"
    plan.write_bytes(rng.bytes(4096))
    for path, needle in ((junk, f"error: model {junk}: not an ONNX model"),
                         (plan, f"error: model {plan}: not a TensorRT engine (it starts with ")):
        for args in ((path,), (lily_onnx, path), (lily_onnx, "--base", path)):
            r = run(*args)
            assert r.exit_code == 1 and "Traceback" not in r.output, r.output
            assert needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
    with pytest.raises(LilyDeployError, match="not a TensorRT engine"):
        check_engine_header(plan, "engine")
    assert check_engine_header(_header(tmp_path / "a.engine", b"ftrt"), "engine") == "TensorRT"
    assert check_engine_header(_header(tmp_path / "b.plan", b"vtrt"), "engine") == "TensorRT-RTX"


def _header(path, magic):
    path.write_bytes(magic + bytes(60))
    return path


def test_reports_never_overwrite_an_input(tiny_roberta_adapter, lily_onnx, tmp_path):
    run = lambda *a: CliRunner().invoke(cli, ["bench", *map(str, a), "--iters", "1", "--no-memory"])  # noqa: E731
    r = run(tiny_roberta_adapter, "--report-dir", tiny_roberta_adapter)
    assert r.exit_code == 1 and f"--report-dir {tiny_roberta_adapter}: is the input model" in r.output, r.output
    r = run(f"lily={tiny_roberta_adapter}", "--report-dir", tiny_roberta_adapter / "rep")
    assert r.exit_code == 1 and "lies inside the input model" in r.output, r.output
    copy = tmp_path / "bench.json"  # an input where the JSON report would go
    copy.write_bytes(lily_onnx.read_bytes())
    r = run(f"lily={copy}", "--report-dir", tmp_path)
    assert r.exit_code == 1 and f"--report-dir {copy}: is the input model" in r.output, r.output
    assert copy.read_bytes() == lily_onnx.read_bytes() and not (tiny_roberta_adapter / "rep").exists()


def test_config_is_validated_naming_the_field_or_flag(lily_onnx):
    for fields, name in ((dict(models=[]), "models"), (dict(batch_sizes=[0]), "batch_sizes"),
                         (dict(seq_lens=[]), "seq_lens"), (dict(threads=0), "threads"), (dict(warmup=-1), "warmup"),
                         (dict(iters=0), "iters"), (dict(iters=2.5), "iters"), (dict(backends=[]), "backends"),
                         (dict(backends=["cuda-magic"]), "backends"), (dict(routing="static"), "routing")):
        with pytest.raises(ConfigError) as info:
            BenchConfig(**{"models": [str(lily_onnx)], **fields})
        assert info.value.field == name and str(info.value).startswith(f"{name}: ") and "--" not in str(info.value)
        with pytest.raises(ConfigError):
            run_bench(**{"models": [str(lily_onnx)], **fields})
    config = BenchConfig(models=str(lily_onnx), base="x", batch_sizes=[2])
    assert config.models == (str(lily_onnx),) and config.base == ("x",) and config.batch_sizes == (2,)
    assert BenchConfig(base=["minilm"]).models == ()  # a base alone is something to measure
    for args, flag in ((("--threads", "0"), "--threads"), (("--warmup", "-1"), "--warmup")):
        r = CliRunner().invoke(cli, ["bench", str(lily_onnx), *args])
        assert r.exit_code == 2 and f"'{flag}'" in r.output and "Traceback" not in r.output, r.output


def test_no_timed_call_follows_another_backends_call():
    """torch's spinning OpenMP threads slow whatever runs next: each backend's turn opens with an untimed call."""
    from lily_deploy.benchmark import BenchModel, BenchTarget, _time_interleaved

    class Bar:
        def update(self, n=1):
            pass

    calls = []  # (backend, runner label) in the order made
    active = []
    for label, backend in [("base", "torch"), ("lily", "torch"), ("base", "onnxruntime"), ("lily", "onnxruntime")]:
        target = BenchTarget(BenchModel(label, label, "torch" if backend == "torch" else "onnx"), backend, runner=None)
        active.append((target, lambda key=(backend, label): calls.append(key)))
    times = _time_interleaved(active, warmup=1, iters=6, bar=Bar())
    assert {k: len(v) for k, v in times.items()} == {t.name: 6 for t, _ in active}
    timed = calls[len(active):]  # after the warm-up round
    assert len(timed) == 6 * (len(active) + 2)  # one untimed call per backend turn
    # every call is preceded by a call of the same backend, except each turn's untimed opener
    switches = [i for i in range(1, len(timed)) if timed[i][0] != timed[i - 1][0]]
    for i in switches:
        assert timed[i + 1][0] == timed[i][0], f"call {i + 1} ({timed[i + 1]}) is timed right after a switch"
    # the runner that goes first in its backend's turn rotates
    openers = [timed[i] for i in [0] + switches]
    assert {o[1] for o in openers if o[0] == "torch"} == {"base", "lily"}
    assert {o[0] for o in openers} == {"torch", "onnxruntime"}
