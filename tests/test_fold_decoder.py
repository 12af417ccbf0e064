"""Fold for decoders: cache-consistent routing (as trained), prompt/response calibration, greedy next-token
agreement on the response tokens as the budget, and folded checkpoints that still export with a KV cache."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import data_file, decoder_adapter
from lily_deploy.calib.router_stats import routing_vectors
from lily_deploy.cli import cli
from lily_deploy.core.config import ConfigError
from lily_deploy.core.data import lm_example, prompt_ids
from lily_deploy.core.deploy import load_model, save_deploy
from lily_deploy.core.lily import hp_mix_stateful
from lily_deploy.folding import fold
from lily_deploy.generation import decode, special_ids
from lily_deploy.onnx_export import export_onnx
from lily_deploy.runtime.decoder import TorchDecoder
from lily_deploy.runtime.decoder_ort import OrtDecoder

PROMPT = "Review: {sentence}\nSentiment:"


def _sst2_rows(n):
    with open(data_file("sst2", "dev.tsv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(PROMPT.format(sentence=r["sentence"].strip()), " positive" if r["label"] == "1" else " negative")
            for r in rows if 3 <= len(r["sentence"].split()) <= 20][:n]


@pytest.fixture(scope="module")
def prompts_jsonl(tmp_path_factory):
    """48 real SST-2 reviews as prompt/response rows (a causal-LM JSONL)."""
    path = tmp_path_factory.mktemp("calib") / "sst2_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in _sst2_rows(48)))
    return path


def _padded_batch(model):
    texts = ["Review: a gripping, beautifully acted film\nSentiment:", "dull", "an instant classic , truly"]
    ids = [prompt_ids(model.tokenizer, t) for t in texts]
    width = max(map(len, ids))
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(ids):  # right-padded
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def test_fold_all_is_the_static_routed_model(llama_adapter, tmp_path):
    report = fold(source=llama_adapter, output=tmp_path / "all", strategy="all", random_inputs=True, size=8,
                  progress=False)
    assert len(report.folded) == 6 and report.routing == "prompt" and report.metric_name == "next-token agreement"
    assert report.samples == 8
    saved = json.loads((tmp_path / "all" / "fold_report.json").read_text())
    assert saved["routing"] == "prompt" and saved["metric_name"] == "next-token agreement"
    folded = load_model(tmp_path / "all")
    assert not folded.layers and len(folded.folded) == 6 and folded.meta["fold"]["routing"] == "prompt"
    for name in folded.folded:
        assert type(folded.model.get_submodule(name)) is torch.nn.Linear
    static = load_model(llama_adapter)
    for d in report.layers:
        static.layers[d.name].set_static(torch.tensor(d.mean_p))
    batch = _padded_batch(static)
    with torch.no_grad():
        want, got = static.logits(**batch), folded.logits(**batch)
    assert (got - want).abs().max() <= 1e-5  # exact


def test_static_by_design_layers_fold_exactly(llama_adapter, tmp_path, prompts_jsonl):
    model = load_model(llama_adapter)
    names = list(model.layers)
    with torch.no_grad():
        model.layers[names[0]].router.weight.zero_()  # uniform mixing
    model.layers[names[3]].set_static(torch.tensor([0.2, 0.5, 0.3]))  # frozen by design
    save_deploy(model, tmp_path / "ckpt")
    batch = _padded_batch(model)
    with torch.no_grad():
        before = load_model(tmp_path / "ckpt").logits(**batch)
    report = fold(source=tmp_path / "ckpt", output=tmp_path / "out", calib=prompts_jsonl, size=16,
                  max_output_error=0.0, progress=False)
    decisions = {d.name: d for d in report.layers}
    assert decisions[names[0]].folded and "zero router" in decisions[names[0]].reason
    assert decisions[names[3]].folded and "static mode" in decisions[names[3]].reason
    assert decisions[names[3]].mean_p == pytest.approx([0.2, 0.5, 0.3], abs=1e-6)
    assert set(report.folded) == {names[0], names[3]}
    assert report.metric_after == report.metric_before == 100.0
    out = load_model(tmp_path / "out")
    assert {layer.mode for layer in out.layers.values()} == {"prompt"}  # the layers left dynamic keep their routing
    with torch.no_grad():
        after = out.logits(**batch)
    assert (after - before).abs().max() <= 1e-5


def _agreement(source, folded, rows) -> float:
    """Greedy next-token agreement on the response tokens, one row at a time (teacher forced, prompt mask set)."""
    same = total = 0
    for prompt, response in rows:
        ids, labels = lm_example(source.model.tokenizer, prompt, response, 128)
        n_prompt = len(prompt_ids(source.model.tokenizer, prompt))
        feeds = (np.array([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None])
        pmask = np.zeros((1, len(ids)), bool)
        pmask[0, :n_prompt] = True
        preds = [dec.step(*feeds, dec.start(1), prompt_mask=pmask)[0][0].argmax(-1)[n_prompt - 1:-1]
                 for dec in (source, folded)]
        same += int((preds[0] == preds[1]).sum())
        total += len(preds[0])
    return 100.0 * same / total


def test_fold_auto_on_prompts_respects_the_budget(llama_adapter, tmp_path, prompts_jsonl):
    out = tmp_path / "auto"
    r = CliRunner().invoke(cli, ["fold", str(llama_adapter), "--calib", str(prompts_jsonl), "--calib-size", "48",
                                 "-o", str(out), "--max-metric-drop", "0.1"])
    assert r.exit_code == 0, r.output
    assert "response-token agreement on calibration data" in r.output
    report = json.loads((out / "fold_report.json").read_text())
    assert report["routing"] == "prompt" and report["metric_name"] == "response-token agreement"
    assert report["samples"] == 48 and report["metric_before"] == 100.0
    assert report["metric_before"] - report["metric_after"] <= 0.1 + 1e-9
    assert report["folded_layers"] >= 1
    for layer in report["layers"]:
        assert set(layer) >= {"name", "folded", "reason", "spread", "output_error", "mean_p"}
        assert layer["spread"] > 0  # per-prompt mixing vectors vary across the reviews
    model = load_model(out)
    assert len(model.folded) == report["folded_layers"] and len(model.layers) == report["dynamic_layers"]
    assert model.meta["fold"]["routing"] == "prompt" and model.meta["fold"]["metric"] == "response-token agreement"
    # the metric, recomputed independently: teacher-forced greedy tokens of the folded vs the unfolded model
    agreement = _agreement(TorchDecoder(load_model(llama_adapter)), TorchDecoder(model), _sst2_rows(48))
    assert agreement == pytest.approx(report["metric_after"], abs=1e-9)


def test_prompt_statistics_are_the_routing_state_means():
    torch.manual_seed(0)
    h, logits, hp = torch.randn(3, 7, 4), torch.randn(3, 7, 5), torch.randn(5 * 4, 6)
    prompt = torch.zeros(3, 7, dtype=torch.bool)
    prompt[0, :4], prompt[1, :7], prompt[2, :2] = True, True, True
    _, state = hp_mix_stateful(h, logits, hp, prompt, None, "prompt", 1.0)
    want = state[:, :5] / state[:, 5:]
    assert torch.allclose(routing_vectors(logits, torch.ones(3, 7), prompt, "prompt"), want, atol=1e-6)
    prompt[2] = False  # a row without a prompt token has no prompt vector
    assert routing_vectors(logits, torch.ones(3, 7), prompt, "prompt").shape == (2, 5)
    mask = torch.ones(3, 7)
    mask[1, 5:] = 0
    assert routing_vectors(logits, mask, None, "token").shape == (19, 5)
    causal = routing_vectors(logits, mask, None, "causal")
    assert torch.allclose(causal[0], torch.softmax(logits[0, 0], -1)) and causal.shape == (19, 5)


@pytest.mark.parametrize("trained, expected", [("causal", "causal"), ("token", "token"), ("batch", "prompt")])
def test_decoders_fold_under_the_routing_they_were_trained_with(tiny_llama_dir, tmp_path, trained, expected):
    adapter = decoder_adapter(tiny_llama_dir, tmp_path / "adapter", routing=trained)
    report = fold(source=adapter, output=tmp_path / "out", strategy="auto", max_output_error=0.01,
                  random_inputs=True, size=8, progress=False)
    assert report.routing == expected
    assert 0 < len(report.folded) < len(report.layers)  # the down projections barely route; q/v do
    assert {layer.mode for layer in load_model(tmp_path / "out").layers.values()} == {expected}


@pytest.mark.parametrize("routing", ["sample", "batch"])
def test_cache_inconsistent_routing_is_refused_for_decoders(llama_adapter, tmp_path, prompts_jsonl, routing):
    r = CliRunner().invoke(cli, ["fold", str(llama_adapter), "--calib", str(prompts_jsonl), "-o",
                                 str(tmp_path / "o"), "--routing", routing])
    assert r.exit_code == 2 and "'--routing'" in r.output and "not exact under a KV cache" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError) as exc:
        fold(source=llama_adapter, output=tmp_path / "o", random_inputs=True, routing=routing, progress=False)
    assert exc.value.field == "routing" and str(exc.value).startswith("routing: ")
    assert not (tmp_path / "o").exists()


def test_fold_decoder_bad_input(llama_adapter, minilm_adapter, tmp_path, prompts_jsonl):
    runner = CliRunner()
    r = runner.invoke(cli, ["fold", str(llama_adapter), "--calib", str(prompts_jsonl), "-o", str(tmp_path / "o"),
                            "--text-column", "sentence"])
    assert r.exit_code == 2 and "'--text-column'" in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(cli, ["fold", str(llama_adapter), "--calib", str(data_file("sst2", "dev.tsv")),
                            "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "causal-LM data is JSONL" in r.output and "Traceback" not in r.output, r.output
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "word " * 200, "response": " positive"}) + "\n")
    r = runner.invoke(cli, ["fold", str(llama_adapter), "--calib", str(long_prompt), "-o", str(tmp_path / "o"),
                            "--max-length", "16"])
    assert r.exit_code == 1 and "line 1: no response token within max_length 16" in r.output, r.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError) as exc:  # prompt routing is for decoders
        fold(source=minilm_adapter, output=tmp_path / "o", random_inputs=True, routing="prompt", progress=False)
    assert exc.value.field == "routing"
    assert not (tmp_path / "o").exists()


def test_folded_decoder_exports_and_generates(llama_adapter, tmp_path, prompts_jsonl):
    report = fold(source=llama_adapter, output=tmp_path / "ckpt", calib=prompts_jsonl, size=16,
                  max_output_error=1e-3, progress=False)
    assert 0 < len(report.folded) < len(report.layers)  # folded plain Linears beside prompt-routed layers
    result = export_onnx(source=tmp_path / "ckpt", output=tmp_path / "folded.onnx", routing="prompt")
    assert result.passed and result.tokens_checked
    assert result.folded_layers == len(report.folded)
    assert result.dynamic_layers == len(report.layers) - len(report.folded)
    model = load_model(tmp_path / "ckpt")
    torch_dec, ort_dec = TorchDecoder(model), OrtDecoder(tmp_path / "folded.onnx")
    assert ort_dec.routing == "prompt" and len(ort_dec.state_inputs) == result.dynamic_layers
    ids = [prompt_ids(model.tokenizer, p) for p, _ in _sst2_rows(4)]
    _, pad = special_ids(model.tokenizer)
    want, _ = decode(torch_dec, ids, 12, None, pad)
    got, _ = decode(ort_dec, ids, 12, None, pad)
    assert got == want
    assert [decode(ort_dec, [one], 12, None, pad)[0][0] for one in ids] == want  # batch-invariant
