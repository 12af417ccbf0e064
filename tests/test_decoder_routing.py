"""Decoder routing modes (prompt, causal) in torch and in the ONNX bodies, held to independent references.

Cache consistency at the level of one layer: a prefill over the prompt and decode steps that
carry the routing state give what one pass over the whole sequence gives; padding (left or
right) changes nothing; onnxruntime's run of the ``lily::HPMixState`` body matches torch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lily_deploy.core.lily import hp_mix_reference, hp_mix_stateful

R, E, D = 4, 3, 6


def _inputs(batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, R, generator=g)
    logits = torch.randn(batch, seq, E, generator=g) * 2
    hp = torch.randn(E * R, D, generator=g)
    return h, logits, hp


def _mix(h_t, p, hp):
    """Independent reference: h_t @ sum_e p_e HP_e for one token."""
    pool = hp.reshape(E, R, D)
    return h_t @ torch.einsum("e,erd->rd", p, pool)


def _ref(h, logits, hp, mask, prompt_len, mode, scale):
    """Per-sample, per-token loops: prompt = mean over the sample's unmasked prompt tokens; causal = running mean."""
    out = torch.zeros(*h.shape[:2], D)
    probs = torch.softmax(logits, -1)
    for b in range(h.shape[0]):
        keep = [t for t in range(h.shape[1]) if mask[b, t]]
        for t in range(h.shape[1]):
            if mode == "prompt":
                idx = [u for u in keep if u < prompt_len[b]]
            else:
                idx = [u for u in keep if u <= t]
            p = probs[b, idx].mean(0) if idx else torch.zeros(E)
            out[b, t] = _mix(h[b, t], p * scale, hp)
    return out


@pytest.mark.parametrize("mode", ["prompt", "causal"])
def test_full_pass_matches_the_loop_reference(mode):
    h, logits, hp = _inputs()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # left padding on sample 0
    prompt_len = [5, 3]
    pm = torch.stack([torch.arange(7) < prompt_len[b] for b in range(2)]).long() * mask
    got = hp_mix_reference(h, logits, hp, pm if mode == "prompt" else mask, mode, 0.5)
    ref = _ref(h, logits, hp, mask, prompt_len, mode, 0.5)
    keep = mask.bool()
    assert torch.allclose(got[keep], ref[keep], atol=1e-5), (got - ref).abs().max()


@pytest.mark.parametrize("mode", ["prompt", "causal"])
def test_prefill_then_decode_with_state_equals_one_pass(mode):
    h, logits, hp = _inputs(seq=9, seed=1)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    prompt = 5
    pm = mask.clone()
    pm[:, prompt:] = 0
    full = hp_mix_reference(h, logits, hp, pm if mode == "prompt" else mask, mode, 0.7)
    y, state = hp_mix_stateful(h[:, :prompt], logits[:, :prompt], hp, mask[:, :prompt], None, mode, 0.7)
    steps = [y]
    for t in range(prompt, 9):
        y, state = hp_mix_stateful(h[:, t:t + 1], logits[:, t:t + 1], hp, mask[:, t:t + 1], state, mode, 0.7)
        steps.append(y)
    cached = torch.cat(steps, dim=1)
    keep = mask.bool()
    assert torch.allclose(cached[keep], full[keep], atol=1e-6), (cached - full)[keep].abs().max()
    # several tokens at once after the prompt (a chunk of the response) continue the same way
    y0, s0 = hp_mix_stateful(h[:, :prompt], logits[:, :prompt], hp, mask[:, :prompt], None, mode, 0.7)
    y1, _ = hp_mix_stateful(h[:, prompt:], logits[:, prompt:], hp, mask[:, prompt:], s0, mode, 0.7)
    assert torch.allclose(torch.cat([y0, y1], 1)[keep], full[keep], atol=1e-6)


@pytest.mark.parametrize("mode", ["prompt", "causal"])
def test_padding_left_or_right_changes_nothing(mode):
    h, logits, hp = _inputs(batch=1, seq=5, seed=2)
    alone = hp_mix_stateful(h, logits, hp, None, None, mode, 1.0)
    pad = 3
    for side in ("left", "right"):
        zeros_h, zeros_l = torch.randn(1, pad, R) * 9, torch.randn(1, pad, E) * 9  # junk in the padding
        if side == "left":
            hh, ll = torch.cat([zeros_h, h], 1), torch.cat([zeros_l, logits], 1)
            m = torch.tensor([[0] * pad + [1] * 5])
            sl = slice(pad, None)
        else:
            hh, ll = torch.cat([h, zeros_h], 1), torch.cat([logits, zeros_l], 1)
            m = torch.tensor([[1] * 5 + [0] * pad])
            sl = slice(0, 5)
        y, state = hp_mix_stateful(hh, ll, hp, m, None, mode, 1.0)
        assert torch.allclose(y[:, sl], alone[0], atol=1e-6)
        assert torch.allclose(state, alone[1], atol=1e-6)


def _state_graph(mode: str):
    import onnx
    from onnx import TensorProto, helper

    from lily_deploy.converters.hpmix import DOMAIN, STATE_OP_TYPE, state_function_body

    node = helper.make_node(STATE_OP_TYPE, ["h", "logits", "hp", "mask", "past"], ["y", "present"], domain=DOMAIN,
                            mode=mode, scale=0.5)
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("h", f, ["B", "T", R]), helper.make_tensor_value_info("logits", f, ["B", "T", E]),
         helper.make_tensor_value_info("hp", f, [E * R, D]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "T"]),
         helper.make_tensor_value_info("past", f, ["B", E + 1])],
        [helper.make_tensor_value_info("y", f, ["B", "T", D]), helper.make_tensor_value_info("present", f, ["B", E + 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                              functions=[state_function_body(mode, 20, R, E)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("mode", ["prompt", "causal"])
def test_onnx_state_body_matches_torch_over_prefill_and_decode(mode):
    from lily_deploy.runtime.ort import ort_session

    session = ort_session(_state_graph(mode).SerializeToString())
    h, logits, hp = _inputs(seq=8, seed=3)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    state_t = None
    state_o = np.zeros((2, E + 1), np.float32)
    for sl in (slice(0, 5), slice(5, 6), slice(6, 8)):
        y_t, state_t = hp_mix_stateful(h[:, sl], logits[:, sl], hp, mask[:, sl], state_t, mode, 0.5)
        y_o, state_o = session.run(None, {"h": h[:, sl].numpy(), "logits": logits[:, sl].numpy(), "hp": hp.numpy(),
                                          "mask": mask[:, sl].numpy(), "past": state_o})
        keep = mask[:, sl].bool().numpy()
        assert np.abs(y_o - y_t.numpy())[keep].max() < 1e-5
        assert np.abs(state_o - state_t.numpy()).max() < 1e-5
