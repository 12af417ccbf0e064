"""``generate`` on torch: cached decoding with cache-consistent Lily routing, batches, sampling, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lily_deploy.cli import cli
from lily_deploy.core.deploy import load_model
from lily_deploy.core.errors import LilyDeployError
from lily_deploy.generation import Sampler, decode, generate, left_pad
from lily_deploy.runtime.decoder import TorchDecoder

PROMPTS = ["the movie was", "a long and rather dull evening at the cinema", "great", "i wanted to like it , but"]


def _prompt_ids(model, prompts=PROMPTS):
    return [model.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def _full_forward_steps(decoder, prompts, tokens, mode):
    """Logits of one uncached pass over prompt + generated tokens, at the positions the decode steps predicted."""
    full = [p + t[:-1] for p, t in zip(prompts, tokens)]
    ids, mask, pos = left_pad(full, 0)
    prompt_mask = None
    if mode == "prompt":
        prompt_mask = np.zeros_like(mask)
        width = ids.shape[1]
        for i, (p, t) in enumerate(zip(prompts, tokens)):
            start = width - len(p) - len(t) + 1
            prompt_mask[i, start:start + len(p)] = 1
    logits, _ = decoder.step(ids, mask, pos, decoder.start(len(full)), prompt_mask=prompt_mask)
    return logits


@pytest.mark.parametrize("adapter_fixture", ["llama_adapter", "qwen2_adapter"])
@pytest.mark.parametrize("mode", ["prompt", "causal", "token"])
def test_cached_decode_is_exact_and_batch_invariant(adapter_fixture, mode, request):
    model = load_model(request.getfixturevalue(adapter_fixture), mode=mode)
    decoder = TorchDecoder(model)
    prompts = _prompt_ids(model)
    n = 8
    # equal-length continuations (no EOS) so every step's logits line up
    tokens, steps = decode(decoder, prompts, n, None, 0, record_logits=True)
    full = _full_forward_steps(decoder, prompts, tokens, mode)
    width = full.shape[1]
    for k, step in enumerate(steps):
        assert np.abs(full[:, width - n + k] - step).max() < 1e-4, (mode, k)
    alone = [decode(decoder, [p], n, None, 0)[0][0] for p in prompts]
    assert alone == tokens


def test_batch_routing_drifts_and_is_refused(llama_adapter):
    model = load_model(llama_adapter, mode="batch")
    with pytest.raises(LilyDeployError, match="batch routing is not exact under a KV cache"):
        TorchDecoder(model)
    decoder = TorchDecoder(model, allow_inconsistent_routing=True)
    prompts = _prompt_ids(model)
    batched, _ = decode(decoder, prompts, 8, None, 0)
    alone = [decode(decoder, [p], 8, None, 0)[0][0] for p in prompts]
    assert batched != alone  # PEFT's semantics: a prompt's tokens depend on its batch


def test_sampling_is_seeded_and_respects_top_k():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 200))
    a, b = Sampler(1.0, seed=3)(logits), Sampler(1.0, seed=3)(logits)
    assert (a == b).all() and len(set(a)) > 1
    assert set(Sampler(1.0, top_k=2, seed=0)(logits)) <= {0, 1}
    assert set(Sampler(1.0, top_p=0.5, seed=0)(logits)) == {0}
    assert (Sampler()(logits) == 0).all()


def test_generate_api_and_cli(llama_adapter, tmp_path):
    result = generate(model=str(llama_adapter), prompts=PROMPTS[:2], max_new_tokens=4, batch_size=2)
    assert [len(r.tokens) for r in result.rows] == [4, 4] and result.backend == "torch-cpu"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:3]) + "\n")
    out = CliRunner().invoke(cli, ["generate", str(llama_adapter), "--prompts", str(prompts), "--max-new-tokens", "4",
                                   "--json", "--batch-size", "2"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.output.strip().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:3] and all(len(r["tokens"]) == 4 for r in rows)
    assert rows[0]["tokens"] == result.rows[0].tokens  # batch composition does not change a prompt's tokens
    streamed = CliRunner().invoke(cli, ["generate", str(llama_adapter), "--prompt", PROMPTS[0], "--max-new-tokens", "3"])
    assert streamed.exit_code == 0 and streamed.output.startswith(PROMPTS[0])


def _fails(args, needle, code=1):
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == code, out.output
    assert "Traceback" not in out.output and needle in out.output, out.output


def test_generate_bad_input(llama_adapter, minilm_adapter, tmp_path):
    _fails(["generate", str(llama_adapter), "--prompt", "x", "--max-new-tokens", "0"], "'--max-new-tokens'", code=2)
    _fails(["generate", str(llama_adapter), "--prompt", "x", "--routing", "batch"], "not exact under a KV cache")
    _fails(["generate", str(llama_adapter), "--prompt", "word " * 200, "--max-new-tokens", "4"],
           "exceeds the model's context of 128")
    _fails(["generate", str(minilm_adapter), "--prompt", "x"], "seq-cls model cannot generate")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt here"}\n')
    _fails(["generate", str(llama_adapter), "--prompts", str(bad)], "line 2")
    _fails(["generate", str(llama_adapter)], "'--prompt'", code=2)
