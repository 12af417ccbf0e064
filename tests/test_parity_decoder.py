"""Generation parity: a causal-LM reference vs exported decoders (greedy tokens, per-step logits,
batch invariance, cache consistency), the drift of batch routing as a finding, and bad input.

On the tiny random Llama / Qwen2 with Lily (conftest), exported with prompt routing.
"""
from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import decoder_adapter
from lily_deploy.cli import cli
from lily_deploy.core.config import ConfigError
from lily_deploy.parity_check import ParityConfig, run_parity

PROMPTS = ["the film was", "a long , slow and rather dull evening at the cinema , but", "great",
           "i wanted to like it", "one of the year 's most intriguing explorations of", "not bad"]
NEW_TOKENS = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def decoders(llama_adapter, qwen2_adapter, tiny_llama_dir, tmp_path_factory):
    """Prompt-routing exports of the Llama and Qwen2 adapters, and of another Llama adapter (seed 1)."""
    from lily_deploy.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("decoders")
    other = decoder_adapter(tiny_llama_dir, out / "other_adapter", seed=1)
    paths = {"llama": out / "llama.onnx", "qwen2": out / "qwen2.onnx", "other": out / "other.onnx"}
    for name, source in (("llama", llama_adapter), ("qwen2", qwen2_adapter), ("other", other)):
        export_onnx(source=source, output=paths[name], routing="prompt")
    return paths


def _cli(*args):
    return CliRunner().invoke(cli, ["parity", *map(str, args)])


def _fails(result, needle, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and needle in result.output, result.output


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_prompt_routing_export_passes(name, decoders, prompts, request):
    adapter = request.getfixturevalue(f"{name}_adapter")
    report = run_parity(reference=adapter, candidates=[decoders[name]], data=prompts, max_new_tokens=NEW_TOKENS,
                        progress=False)
    assert report and report.passed and report.verdict == "PASSED", report.table()
    (c,) = report.candidates
    assert c.status == "PASSED" and c.routing == "prompt" and c.precision == "fp32"
    assert [b.batch_size for b in c.batches] == [1, len(PROMPTS)]  # batch 8 runs as one batch of all 6
    for b in c.batches:
        assert b.metric == 100.0 and b.exact == len(PROMPTS) and b.first_diverging_step is None
        assert b.logits_max_abs <= 1e-4 and b.logits_median_abs <= b.logits_max_abs and b.steps_compared > 1
    assert c.invariance.passed is True and all(d.differ == 0 for d in c.invariance.comparisons)
    assert [(k.who, k.passed) for k in c.cache] == [("candidate", True), ("torch reference", True)]
    assert all(k.max_abs <= 1e-4 for k in c.cache)
    assert not report.findings  # prompt routing as trained: nothing to report
    data = report.to_json()
    assert data["kind"] == "parity" and data["mode"] == "generation" and data["verdict"] == "PASSED"
    assert data["data"]["prompts"] == len(PROMPTS) and data["data"]["max_new_tokens"] == NEW_TOKENS
    assert "exact match" in report.table() and report.final_line().startswith("PASSED")


def test_torch_candidate_and_builtin_prompts(llama_adapter, decoders):
    """A model folder runs in torch (same model: identical); without data the built-in prompts run, and say so."""
    report = run_parity(reference=llama_adapter, candidates=[decoders["llama"], llama_adapter], max_new_tokens=6,
                        limit=3, batch_sizes=[2], progress=False)
    assert report.passed, report.table()
    onnx_c, torch_c = report.candidates
    assert torch_c.kind == "torch" and torch_c.batches[0].logits_max_abs == 0.0
    assert [b.batch_size for b in onnx_c.batches] == [2]
    assert onnx_c.invariance.passed is True  # alone (run apart) vs batches of 2
    assert report.data["prompts"] == 3 and report.data["builtin"]
    assert any("built-in prompts" in n for n in report.notes)


def test_other_adapter_fails_naming_the_first_diverging_step(llama_adapter, decoders, prompts):
    result = _cli("--reference", llama_adapter, "--candidate", decoders["llama"], "--candidate", decoders["other"],
                  "--data", prompts, "--max-new-tokens", 8)
    _fails(result, "first diverging at step")
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("FAILED") and "1 passed, 1 failed of 2 candidates" in last and "other.onnx" in last
    report = run_parity(reference=llama_adapter, candidates=[decoders["other"]], data=prompts, max_new_tokens=8,
                        progress=False)
    assert not report
    (c,) = report.candidates
    assert c.status == "FAILED" and c.batches[0].metric < 100.0 and c.batches[0].first_diverging_step >= 1
    assert c.failures[0].name == "exact match, batch 1"


@pytest.mark.parametrize("recorded", ["batch", None])
def test_batch_trained_reference_reports_drift(recorded, tiny_llama_dir, decoders, prompts, tmp_path):
    """Same weights as llama_adapter, trained with batch routing (or none recorded: PEFT's batch)."""
    from lily_deploy.core.adapters import SIDECAR

    adapter = decoder_adapter(tiny_llama_dir, tmp_path / "batch_adapter", routing="batch")
    if recorded is None:
        (adapter / SIDECAR).write_text(json.dumps({"task": "causal-lm"}))
    report = run_parity(reference=adapter, candidates=[decoders["llama"]], data=prompts, max_new_tokens=NEW_TOKENS,
                        progress=False)
    assert report.passed, report.table()  # the candidate against the reference re-routed by prompt
    assert report.reference["routing"] == "batch"
    assert any("re-routed by prompt" in n and "batch" in n for n in report.candidates[0].notes)
    (drift,) = report.findings
    assert drift.routing == "batch" and drift.cached_vs_uncached.total == len(PROMPTS) * NEW_TOKENS
    assert drift.alone_vs_batched.differ > 0  # PEFT's semantics: a prompt's tokens depend on its batch
    assert f"of {len(PROMPTS) * NEW_TOKENS} tokens differ" in drift.text()
    assert report.to_json()["findings"][0]["text"].startswith("FINDING")
    result = _cli("--reference", adapter, "--candidate", decoders["llama"], "--data", prompts,
                  "--max-new-tokens", NEW_TOKENS)
    assert result.exit_code == 0, result.output
    assert "FINDING: the torch reference under its own batch routing" in result.output
    assert result.output.strip().splitlines()[-1].startswith("PASSED")


def test_json_and_report_dir(llama_adapter, decoders, prompts, tmp_path):
    out = tmp_path / "reports"
    result = _cli("--reference", llama_adapter, "--candidate", decoders["llama"], "--data", prompts,
                  "--max-new-tokens", 4, "--json", "--report-dir", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "parity.json").read_text())
    assert data["mode"] == "generation" and data["passed"] and data["candidates"][0]["cache"]
    assert "generation parity: PASSED" in (out / "parity.md").read_text()


def _graph(path, task, inputs=("input_ids",)):
    """A tiny ONNX graph with ``lily_deploy.task`` metadata (what parity reads before loading)."""
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in inputs]
    node = helper.make_node("Cast", [inputs[0]], ["logits"], to=TensorProto.FLOAT)
    model = helper.make_model(helper.make_graph([node], "g", ins, [helper.make_tensor_value_info(
        "logits", TensorProto.FLOAT, ["batch", "sequence"])]), opset_imports=[helper.make_opsetid("", 17)])
    entry = model.metadata_props.add()
    entry.key, entry.value = "lily_deploy.task", task
    onnx.save(model, str(path))
    return path


def test_bad_input(llama_adapter, minilm_adapter, decoders, prompts, tmp_path):
    encoder = _graph(tmp_path / "encoder.onnx", "seq-cls")
    _fails(_cli("--reference", llama_adapter, "--candidate", encoder, "--data", prompts),
           f"--candidate {encoder} is a seq-cls model, but --reference {llama_adapter} is a causal-lm model")
    _fails(_cli("--reference", minilm_adapter, "--candidate", decoders["llama"]),
           f"--candidate {decoders['llama']} is a causal-lm model, but --reference {minilm_adapter} is a seq-cls")
    no_cache = _graph(tmp_path / "plain.onnx", "causal-lm", ("input_ids", "attention_mask"))
    _fails(_cli("--reference", llama_adapter, "--candidate", no_cache, "--data", prompts),
           "not a decoder graph with a KV cache")
    tsv = tmp_path / "prompts.tsv"
    tsv.write_text("sentence\tlabel\ngood\t1\n")
    _fails(_cli("--reference", llama_adapter, "--candidate", decoders["llama"], "--data", tsv),
           "causal-LM data is JSONL")
    no_prompt = tmp_path / "texts.jsonl"
    no_prompt.write_text('{"text": "a text, not a prompt"}\n')
    _fails(_cli("--reference", llama_adapter, "--candidate", decoders["llama"], "--data", no_prompt),
           "line 1 has no 'prompt' field")


def test_usage_errors_name_the_flag_or_field(llama_adapter, minilm_adapter, decoders, prompts):
    _fails(_cli("--reference", llama_adapter, "--candidate", decoders["llama"], "--max-new-tokens", 0),
           "'--max-new-tokens'", code=2)
    _fails(_cli("--reference", llama_adapter, "--candidate", decoders["llama"], "--data", prompts,
                "--metric", "agreement"), "'--metric'", code=2)
    _fails(_cli("--reference", minilm_adapter, "--candidate", decoders["llama"], "--routing", "prompt"),
           "is a causal-lm model", code=1)  # the task mismatch is found first
    with pytest.raises(ConfigError, match="max_new_tokens: must be >= 1"):
        ParityConfig(reference=llama_adapter, candidates=[decoders["llama"]], max_new_tokens=0)
    with pytest.raises(ConfigError, match="^metric: the reference is a causal LM"):
        run_parity(reference=llama_adapter, candidates=[decoders["llama"]], metric="agreement", progress=False)
    with pytest.raises(ConfigError, match="^routing: prompt routing is for decoders"):
        run_parity(reference=minilm_adapter, candidates=[minilm_adapter], routing="prompt", progress=False)
    _fails(_cli("--reference", minilm_adapter, "--candidate", minilm_adapter, "--routing", "causal"),
           "'--routing'", code=2)
