"""Decoders exported with a KV cache and the Lily routing state: onnxruntime generates what torch generates.

For Llama and Qwen2 (biased q/k/v, grouped-query attention) with Lily on q/v/down projections,
under prompt, causal and token routing (and Mistral, sliding-window attention, under prompt routing): 32 greedy tokens for 16 real SST-2 review prompts,
alone and in a left-padded batch of 8, identical tokens and per-step logits within 1e-4 (fp32).
"""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import data_file, decoder_adapter
from lily_deploy.cli import cli
from lily_deploy.core.data import prompt_ids, read_text_table
from lily_deploy.core.deploy import load_model
from lily_deploy.generation import decode, special_ids
from lily_deploy.onnx_export import export_onnx
from lily_deploy.runtime.decoder import TorchDecoder
from lily_deploy.runtime.decoder_ort import OrtDecoder

NEW_TOKENS = 32


def _prompts(n=16):
    table = read_text_table(data_file("sst2", "dev.tsv"), limit=400)
    texts = [t for t in table.texts if 3 <= len(t.split()) <= 14][:n]
    return [f"Review: {t}\nSentiment:" for t in texts]


@pytest.fixture(scope="module")
def prompts():
    return _prompts()


@pytest.mark.parametrize("adapter_fixture, mode", [
    (a, m) for a in ("llama_adapter", "qwen2_adapter") for m in ("prompt", "causal", "token")
] + [("mistral_adapter", "prompt")])
def test_onnxruntime_generates_what_torch_generates(adapter_fixture, mode, prompts, request, tmp_path):
    adapter = request.getfixturevalue(adapter_fixture)
    path = tmp_path / "decoder.onnx"
    result = export_onnx(source=adapter, output=path, routing=mode)
    assert result.passed and result.tokens_checked and path.is_file()
    model = load_model(adapter, mode=mode)
    torch_dec, ort_dec = TorchDecoder(model), OrtDecoder(path)
    assert ort_dec.routing == mode and (len(ort_dec.state_inputs) == 6) == (mode != "token")
    ids = [prompt_ids(model.tokenizer, p) for p in prompts]
    _, pad = special_ids(model.tokenizer)
    alone = []
    for one in ids:
        ref, ref_steps = decode(torch_dec, [one], NEW_TOKENS, None, pad, record_logits=True)
        got, got_steps = decode(ort_dec, [one], NEW_TOKENS, None, pad, record_logits=True)
        assert got == ref
        assert max(np.abs(g - r).max() for g, r in zip(got_steps, ref_steps)) < 1e-4
        alone.append(got[0])
    for start in (0, 8):
        batch = ids[start:start + 8]
        ref, ref_steps = decode(torch_dec, batch, NEW_TOKENS, None, pad, record_logits=True)
        got, got_steps = decode(ort_dec, batch, NEW_TOKENS, None, pad, record_logits=True)
        assert got == ref == alone[start:start + 8]  # identical to torch, and batch-invariant
        assert max(np.abs(g - r).max() for g, r in zip(got_steps, ref_steps)) < 1e-4


def test_batch_routing_is_refused_under_a_cache_unless_asked(tiny_llama_dir, tmp_path, prompts):
    adapter = decoder_adapter(tiny_llama_dir, tmp_path / "batch_adapter", routing="batch")
    out = CliRunner().invoke(cli, ["export", str(adapter), "-o", str(tmp_path / "b.onnx")])
    assert out.exit_code == 1 and "batch routing is not exact under a KV cache" in out.output
    assert "Traceback" not in out.output and not (tmp_path / "b.onnx").exists()
    out = CliRunner().invoke(cli, ["export", str(adapter), "-o", str(tmp_path / "b.onnx"),
                                   "--allow-inconsistent-routing"])
    assert out.exit_code == 0, out.output
    dec = OrtDecoder(tmp_path / "b.onnx", allow_inconsistent_routing=True)
    model = load_model(adapter)
    ids = [prompt_ids(model.tokenizer, p) for p in prompts[:8]]
    batched, _ = decode(dec, ids, 8, None, 0)
    alone = [decode(dec, [one], 8, None, 0)[0][0] for one in ids]
    assert batched != alone  # PEFT's batch routing: a prompt's continuation depends on its batch
    with pytest.raises(Exception, match="batch routing is not exact"):
        OrtDecoder(tmp_path / "b.onnx")


def test_no_cache_gives_a_plain_logits_graph(llama_adapter, tmp_path):
    import onnx

    out = CliRunner().invoke(cli, ["export", str(llama_adapter), "-o", str(tmp_path / "plain.onnx"), "--no-cache",
                                   "--routing", "causal"])
    assert out.exit_code == 0, out.output
    names = [i.name for i in onnx.load(str(tmp_path / "plain.onnx"), load_external_data=False).graph.input]
    assert names == ["input_ids", "attention_mask"]


def test_decoder_routing_refused_for_encoders(minilm_adapter, tmp_path):
    out = CliRunner().invoke(cli, ["export", str(minilm_adapter), "-o", str(tmp_path / "e.onnx"), "--routing",
                                   "prompt"])
    assert out.exit_code == 2 and "prompt routing is for decoders" in out.output


def test_generate_refuses_an_encoder_graph_and_a_graph_without_cache(llama_adapter, minilm_adapter, tmp_path):
    CliRunner().invoke(cli, ["export", str(llama_adapter), "-o", str(tmp_path / "plain.onnx"), "--no-cache",
                             "--routing", "prompt"])
    out = CliRunner().invoke(cli, ["generate", str(tmp_path / "plain.onnx"), "--prompt", "x"])
    assert out.exit_code == 1 and "no past_key_values" in out.output and "Traceback" not in out.output
    export_onnx(source=minilm_adapter, output=tmp_path / "enc.onnx")
    out = CliRunner().invoke(cli, ["generate", str(tmp_path / "enc.onnx"), "--prompt", "x"])
    assert out.exit_code == 1 and "seq-cls graph cannot generate" in out.output


def test_decoder_graph_builds_with_tensorrt_for_rtx(llama_adapter, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed (pip install tensorrt-rtx-cu12)")
    from lily_deploy.trt_build import build_engine

    export_onnx(source=llama_adapter, output=tmp_path / "d.onnx", routing="prompt", validation=False)
    report = build_engine(onnx_path=tmp_path / "d.onnx", output=tmp_path / "d.plan", backend="tensorrt-rtx",
                          compute_capabilities=["sm89"], progress=False)
    assert (tmp_path / "d.plan").is_file() and report.data["engine"]["bytes"] > 10_000
    profiles = report.data["profiles"]
    assert len(profiles) >= 2  # one for prefill (past 0), one for decode (one new token)


@pytest.mark.gpu
def test_tensorrt_decoder_generates_what_torch_generates(llama_adapter, tmp_path, prompts):
    """On a GPU TensorRT supports: the engine of a decoder graph decodes like torch (prefill and decode profiles)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: running an engine needs one")
    from lily_deploy.runtime.decoder_trt import TrtDecoder
    from lily_deploy.trt_build import build_engine

    export_onnx(source=llama_adapter, output=tmp_path / "d.onnx", routing="prompt")
    try:
        build_engine(onnx_path=tmp_path / "d.onnx", output=tmp_path / "d.plan", compute_capabilities=["current"],
                     progress=False)
    except Exception as exc:  # e.g. TensorRT for RTX on Hopper, or no TensorRT installed
        pytest.skip(f"no TensorRT that builds for this GPU: {exc}")
    model = load_model(llama_adapter, mode="prompt")
    ids = [prompt_ids(model.tokenizer, p) for p in prompts[:8]]
    ref, ref_steps = decode(TorchDecoder(model), ids, 16, None, 0, record_logits=True)
    got, got_steps = decode(TrtDecoder(tmp_path / "d.plan"), ids, 16, None, 0, record_logits=True)
    assert got == ref
    assert max(np.abs(g - r).max() for g, r in zip(got_steps, ref_steps)) < 1e-3
