"""Switchable adapters: one base graph (and engine), many Lily adapters of the same shapes, chosen per call."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import build_rtx_engine, make_lily_adapter

from lily_deploy.cli import cli
from lily_deploy.core.errors import LilyDeployError

ATOL = 1e-4  # the export's default fp32 tolerance on the logits


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _ok(*args):
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    return result


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tiny_bert(out, seed=0):
    """A tiny random BERT encoder (no classification head saved: each adapter trains its own)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lily_deploy.core.models import minilm_path

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=258, type_vocab_size=2)
    BertModel(cfg).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(str(out))
    return out


def _adapter(base, out, targets=("query", "value"), **kw):
    kw = {"num_labels": 2, "num_b": 4, "scale": 4.0, **kw}
    return make_lily_adapter(str(base), out, list(targets), **kw)


@pytest.fixture(scope="module")
def switch(tmp_path_factory, one_torch_thread):
    """Adapters A and B (same shapes, different values, heads and scaling) on one switchable graph exported from A."""
    root = tmp_path_factory.mktemp("switch")
    base_dir = _tiny_bert(root / "tiny-bert")
    a = _adapter(base_dir, root / "a", seed=0)
    b = _adapter(base_dir, root / "b", seed=1, scale=2.0)
    base = root / "base.onnx"
    _ok("export", a, "-o", base, "--switchable")
    for name in ("a", "b"):
        out = _ok("adapter", "pack", root / name, "--for", base, "-o", root / f"{name}.onnx_adapter").output
        assert "with its classification head" in out
    return {"root": root, "a": a, "b": b, "base": base, "base_dir": base_dir}


def _reference(adapter, batch_size=4, seed=3):
    from lily_deploy.core.deploy import open_model
    from lily_deploy.onnx_export import example_inputs
    from lily_deploy.runtime.torch_runner import TorchRunner

    deploy = open_model(adapter)
    deploy.set_routing("sample")
    inputs = example_inputs(deploy, None, batch_size=batch_size, seed=seed)
    return inputs, TorchRunner(deploy).infer(inputs)["logits"]


def _agree(got, ref):
    return float(np.abs(got - ref).max()), float((got.argmax(-1) == ref.argmax(-1)).mean())


def test_two_adapters_on_one_session_each_match_their_torch_reference(switch):
    from lily_deploy.runtime.ort import OrtRunner

    runner = OrtRunner(switch["base"])
    refs = {k: _reference(switch[k]) for k in ("a", "b")}
    assert np.abs(refs["a"][1] - refs["b"][1]).max() > 1e-3  # the two adapters really differ
    for k in ("a", "b", "a", "b", "b", "a"):  # switching back and forth on the same session
        inputs, ref = refs[k]
        got = runner.infer(inputs, adapter=switch["root"] / f"{k}.onnx_adapter")["logits"]
        max_abs, top1 = _agree(got, ref)
        assert max_abs <= ATOL and top1 == 1.0, (k, max_abs, top1)
    # no adapter: the graph's defaults are adapter A's values
    max_abs, top1 = _agree(runner.infer(refs["a"][0])["logits"], refs["a"][1])
    assert max_abs <= ATOL and top1 == 1.0


def test_a_runner_spec_names_its_adapter(switch):
    from lily_deploy.runtime import kind_of, open_runner

    spec = f"{switch['base']}+{switch['root'] / 'b.onnx_adapter'}"
    assert kind_of(spec) == "onnx"
    runner = open_runner(spec)
    assert runner.name == "base.onnx+b.onnx_adapter"
    assert not any(n.startswith("adapter.") for n in runner.input_names)  # parity and bench feed the model inputs
    inputs, ref = _reference(switch["b"], batch_size=2, seed=5)
    max_abs, top1 = _agree(runner.infer(inputs)["logits"], ref)
    assert max_abs <= ATOL and top1 == 1.0
    timed = runner.bind(inputs)  # bench's path: the adapter stays active in the bound call
    timed()


def test_graph_metadata_lists_adapter_tensors_and_base_hash(switch):
    import onnx

    model = onnx.load(str(switch["base"]))
    info = json.loads({p.key: p.value for p in model.metadata_props}["lily_deploy.switchable"])
    names = set(info["tensors"])
    assert {n.split(".")[1] for n in names} == {"lp", "router", "hp", "head"}
    graph_inputs = {i.name for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    assert names <= graph_inputs and names <= inits  # inputs with defaults
    assert len(info["base_sha256"]) == 64 and info["routing"] == "sample"
    # 4 layers x (query, value): 8 routers, LPs of stride 2: 2 per target, one HP pool per target
    assert sum(n.startswith("adapter.router.") for n in names) == 8
    assert sum(n.startswith("adapter.lp.") for n in names) == 4
    assert sum(n.startswith("adapter.hp.") for n in names) == 2


def test_pack_refuses_an_adapter_of_other_shapes(switch):
    other = _adapter(switch["base_dir"], switch["root"] / "r4", r=4, seed=2)
    result = _cli("adapter", "pack", other, "--for", switch["base"], "-o", switch["root"] / "r4.onnx_adapter")
    _one_line_error(result, "adapter.", "has shape")
    assert not (switch["root"] / "r4.onnx_adapter").exists()


def test_pack_refuses_an_adapter_of_another_base(switch, tmp_path):
    other_base = _tiny_bert(tmp_path / "other-base", seed=7)  # the same architecture with other weights
    adapter = _adapter(other_base, tmp_path / "ad")
    result = _cli("adapter", "pack", adapter, "--for", switch["base"], "-o", tmp_path / "x.onnx_adapter")
    _one_line_error(result, "other base weights")


def test_pack_refuses_other_targets_naming_the_tensor(switch, tmp_path):
    adapter = _adapter(switch["base_dir"], tmp_path / "qk", targets=("query", "key"))
    result = _cli("adapter", "pack", adapter, "--for", switch["base"], "-o", tmp_path / "x.onnx_adapter")
    _one_line_error(result, "adapter.")


def test_pack_refuses_a_lora_adapter(switch, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(str(switch["base_dir"]), num_labels=2)
    get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")) \
        .save_pretrained(str(tmp_path / "lora"))
    result = _cli("adapter", "pack", tmp_path / "lora", "--for", switch["base"], "-o", tmp_path / "x.onnx_adapter")
    _one_line_error(result, "LORA", "Lily")


def test_a_folded_checkpoint_cannot_switch(switch, tmp_path):
    from lily_deploy.folding import fold

    fold(source=switch["a"], output=tmp_path / "folded", strategy="all", random_inputs=True, size=8, progress=False)
    result = _cli("export", tmp_path / "folded", "-o", tmp_path / "f.onnx", "--switchable")
    _one_line_error(result, "folded", "cannot switch")
    assert not (tmp_path / "f.onnx").exists()
    result = _cli("adapter", "pack", tmp_path / "folded", "--for", switch["base"], "-o", tmp_path / "x.onnx_adapter")
    _one_line_error(result, "folded")


def test_damaged_or_misplaced_adapter_files_are_one_line(switch, tmp_path):
    from lily_deploy.runtime.ort import OrtRunner

    good = (switch["root"] / "b.onnx_adapter").read_bytes()
    damaged = tmp_path / "damaged.onnx_adapter"
    damaged.write_bytes(good[: len(good) // 3])
    runner = OrtRunner(switch["base"])
    with pytest.raises(LilyDeployError, match="not a readable ONNX Runtime adapter file") as err:
        runner.infer(_reference(switch["b"], 1)[0], adapter=damaged)
    assert "\n" not in str(err.value)
    with pytest.raises(LilyDeployError, match="no such adapter file"):
        OrtRunner(f"{switch['base']}+{tmp_path / 'missing.onnx_adapter'}")
    # a plain (baked-in) export takes no adapter; packing for it says so
    plain = tmp_path / "plain.onnx"
    _ok("export", switch["a"], "-o", plain)
    with pytest.raises(LilyDeployError, match="not a switchable graph"):
        OrtRunner(plain, adapter=switch["root"] / "b.onnx_adapter")
    result = _cli("adapter", "pack", switch["b"], "--for", plain, "-o", tmp_path / "x.onnx_adapter")
    _one_line_error(result, "not a switchable graph")
    result = _cli("adapter", "pack", switch["b"], "--for", switch["base"], "-o", tmp_path / "x.bin")
    assert result.exit_code == 2 and ".onnx_adapter" in result.output


@pytest.mark.trt
def test_one_rtx_engine_takes_the_adapter_tensors_as_inputs(switch, tmp_path):
    import onnx

    report = build_rtx_engine(switch["base"], tmp_path / "base.plan")
    names = set(json.loads({p.key: p.value for p in onnx.load(str(switch["base"])).metadata_props}
                           ["lily_deploy.switchable"])["tensors"])
    inputs = {t["name"]: t for t in report["inputs"]}
    assert names <= set(inputs)
    for name in names:  # fixed shapes: one profile serves every adapter of these shapes
        prof = report["profiles"][0][name]
        assert prof["min"] == prof["max"] == inputs[name]["shape"]
    assert any("adapter tensors are engine inputs" in n for n in report["notes"])


def test_parity_and_bench_take_base_plus_adapter(switch, tmp_path):
    """The CLI as a user runs it: each adapter PASSES against its own reference on one graph, fails against the other."""
    root = switch["root"]
    spec = {k: f"{switch['base']}+{root / f'{k}.onnx_adapter'}" for k in ("a", "b")}
    result = _ok("parity", "--reference", switch["b"], "--candidate", spec["b"])
    assert "base.onnx+b.onnx_adapter: PASSED" in result.output and "top-1 agreement 100.00%" in result.output
    result = _cli("parity", "--reference", switch["b"], "--candidate", spec["a"])
    assert result.exit_code == 1 and "base.onnx+a.onnx_adapter: FAILED" in result.output
    damaged = tmp_path / "damaged.onnx_adapter"
    damaged.write_bytes((root / "b.onnx_adapter").read_bytes()[:100])
    _one_line_error(_cli("parity", "--reference", switch["b"], "--candidate", f"{switch['base']}+{damaged}"),
                    "not a readable ONNX Runtime adapter file")
    result = _ok("bench", spec["b"], "--batch-sizes", "1", "--seq-lens", "16", "--iters", "2", "--warmup", "1",
                 "--backends", "onnxruntime")
    assert "base+b" in result.output
