"""``bench`` on decoders: prefill ms and decode tokens/s per model and backend, in one interleaved run."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lily_deploy.cli import cli


@pytest.fixture(scope="module")
def graphs(tiny_llama_dir, llama_adapter, tmp_path_factory):
    from lily_deploy.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("decbench")
    base, lily = d / "base.onnx", d / "lily.onnx"
    export_onnx(source=str(tiny_llama_dir), output=str(base))
    export_onnx(source=str(llama_adapter), output=str(lily))
    return base, lily


def test_decoders_are_timed_by_generation_with_ratios_to_the_base(graphs, llama_adapter, tmp_path):
    base, lily = graphs
    report_dir = tmp_path / "rep"
    result = CliRunner().invoke(cli, ["bench", f"base={base}", f"lily={lily}", f"lily_torch={llama_adapter}",
                                      "--base", "base", "--batch-sizes", "1,2", "--seq-lens", "8", "--new-tokens",
                                      "3", "--warmup", "1", "--iters", "2", "--threads", "1", "--json",
                                      "--report-dir", str(report_dir)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[:result.output.rindex("}") + 1])
    assert data["kind"] == "decoder-bench" and data["settings"]["base"] == "base"
    rows = {(r["label"], r["batch"]): r for r in data["results"]}
    assert set(rows) == {(m, b) for m in ("base", "lily", "lily_torch") for b in (1, 2)}
    assert rows[("lily", 1)]["backend"] == "onnxruntime-cpu" and rows[("lily_torch", 1)]["backend"] == "torch-cpu"
    for r in rows.values():
        assert r["prefill_ms"] > 0 and r["tokens_per_s"] > 0 and r["prompt_len"] == 8
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / (r["decode_ms_per_token"] / 1000))
    assert rows[("base", 2)]["tokens_per_s_ratio"] == pytest.approx(1.0)
    assert rows[("lily", 2)]["ratio_p25"] <= rows[("lily", 2)]["ratio_p75"]
    assert (report_dir / "decoder-bench.json").is_file() and (report_dir / "decoder-bench.md").is_file()


def test_a_decoder_and_an_encoder_in_one_run_are_refused(graphs, minilm_adapter):
    result = CliRunner().invoke(cli, ["bench", f"lily={graphs[1]}", f"enc={minilm_adapter}", "--no-memory"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "enc" in result.output and "separate runs" in result.output
