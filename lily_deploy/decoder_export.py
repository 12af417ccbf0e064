"""``export`` for decoders: one ONNX graph with a KV cache and the Lily routing state, for prefill and decode.

Inputs ``input_ids [B, T]``, ``attention_mask [B, P+T]``, ``position_ids [B, T]``,
``past_key_values.{i}.key/.value [B, kv_heads, P, head_dim]`` and, per ``prompt``/``causal``
Lily layer, ``past_routing.{j} [B, E+1]``; outputs ``logits [B, T, V]``, ``present.{i}.key/.value``
and ``present_routing.{j}``. Past length 0 (empty past, zero state) is the prefill. Validation
generates greedily on onnxruntime and in torch from the same prompts -- alone and as a
left-padded batch -- and compares the logits of every step and the tokens.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from .converters.hpmix import attach_function_bodies, hpmix_nodes, inline_bodies, onnx_translation
from .core.errors import LilyDeployError
from .core.models import forward_with_cache
from .core.modes import CACHE_INCONSISTENT
from .runtime.decoder import routing_modes, state_layers

VALIDATION_PROMPTS = ["the film was", "a long , slow and rather dull evening at the cinema , but", "great",
                      "i wanted to like it"]
OUTPUT_NAME = "logits"


def cache_geometry(deploy) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder's attention cache, from its config."""
    cfg = deploy.model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, head_dim


class DecoderGraph(nn.Module):
    """Flat tensors in and out, as the ONNX graph has them: ``(ids, mask, positions, *past) -> (logits, *present)``."""

    def __init__(self, deploy, layers: int, state_names: Sequence[str]):
        super().__init__()
        self.deploy, self.layers, self.state_names = deploy, layers, list(state_names)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        kv, routing = past[: 2 * self.layers], past[2 * self.layers:]
        ctx = self.deploy.context
        seq = input_ids.shape[1]  # narrow, not a slice: its length stays the traced `sequence` symbol
        ctx.mask = attention_mask.narrow(1, attention_mask.shape[1] - seq, seq)
        ctx.past = dict(zip(self.state_names, routing))
        ctx.present = {}
        cache = DynamicCache(ddp_cache_data=[(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)])
        try:
            out, new = forward_with_cache(self.deploy.model, cache, input_ids=input_ids,
                                          attention_mask=attention_mask, position_ids=position_ids)
            present = [t for layer in new.layers for t in (layer.keys, layer.values)]
            state = [ctx.present[name] for name in self.state_names]
        finally:
            ctx.mask, ctx.past, ctx.present = None, {}, {}
        return (out.logits, *present, *state)


def io_names(layers: int, states: int) -> tuple[list[str], list[str]]:
    ins, outs = ["input_ids", "attention_mask", "position_ids"], [OUTPUT_NAME]
    for i in range(layers):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    ins += [f"past_routing.{j}" for j in range(states)]
    outs += [f"present_routing.{j}" for j in range(states)]
    return ins, outs


def trace_decoder(deploy, opset: int, ops: str):
    """The traced decoder graph (custom ``lily::`` nodes with their bodies, or inlined with ``ops='standard'``)."""
    layers, kv_heads, head_dim = cache_geometry(deploy)
    names = state_layers(deploy)
    num_hp = next(iter(deploy.layers.values())).num_hp if deploy.layers else 0
    wrapper = DecoderGraph(deploy, layers, names).eval()
    batch, seq, past = 2, 3, 4  # >= 2 on every dynamic axis, or torch.export specialises it
    vocab = int(deploy.model.config.vocab_size)
    args = [torch.randint(5, vocab, (batch, seq)), torch.ones(batch, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).expand(batch, seq).contiguous()]
    args += [torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * layers)]
    args += [torch.zeros(batch, num_hp + 1) for _ in names]
    ins, outs = io_names(layers, len(names))
    shapes = [{0: "batch", 1: "sequence"}, {0: "batch", 1: "total_sequence"}, {0: "batch", 1: "sequence"}]
    shapes += [{0: "batch", 2: "past_sequence"} for _ in range(2 * layers)] + [{0: "batch"} for _ in names]
    deploy.context.use_custom_op = True
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, tuple(args), dynamo=True, opset_version=opset, input_names=ins,
                                        output_names=outs, dynamic_shapes=(shapes[0], shapes[1], shapes[2], tuple(shapes[3:])),
                                        custom_translation_table=onnx_translation(), optimize=True, verbose=False)
    except Exception as exc:  # the exporter's messages are long: keep the line that names the problem
        detail = [l for l in str(exc).splitlines() if "Error" in l or "not supported" in l or "call_function" in l]
        raise LilyDeployError(f"decoder export failed: {(detail[-1] if detail else str(exc).splitlines()[0])[:400]}")
    finally:
        deploy.context.use_custom_op = False
    model = program.model_proto
    if deploy.layers:
        first = next(iter(deploy.layers.values()))
        attach_function_bodies(model, rank=first.rank, num_hp=first.num_hp)
    if ops == "standard":
        model = inline_bodies(model)
    elif deploy.layers and len(hpmix_nodes(model)) != len(deploy.layers):
        raise LilyDeployError(f"expected {len(deploy.layers)} lily:: nodes, the decoder graph has "
                              f"{len(hpmix_nodes(model))}")
    return model


def decoder_metadata(deploy) -> dict:
    """What ``generate`` and ``parity`` read back: the cache layout and the context length."""
    layers, kv_heads, head_dim = cache_geometry(deploy)
    cfg = deploy.model.config
    return {"lily_deploy.cache": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
                                  "routing_state": state_layers(deploy)},
            "lily_deploy.vocab_size": int(cfg.vocab_size),
            "lily_deploy.max_positions": getattr(cfg, "max_position_embeddings", None),
            "lily_deploy.outputs": io_names(layers, len(state_layers(deploy)))[1]}


def validate_decoder(deploy, onnx_path, atol: float, new_tokens: int = 6, prompts: Sequence[str] = ()):
    """Greedy generation on onnxruntime vs torch, alone and batched: per-step logits and tokens.

    Returns ``Comparison`` rows (one per batch shape and step kind), a note per token mismatch, and
    what was generated.
    """
    import numpy as np

    from .core.data import prompt_ids
    from .generation import decode, special_ids
    from .onnx_export import Comparison
    from .runtime.decoder import TorchDecoder
    from .runtime.decoder_ort import OrtDecoder

    reference = TorchDecoder(deploy, "torch", allow_inconsistent_routing=True)
    candidate = OrtDecoder(onnx_path, allow_inconsistent_routing=True)
    _, pad = special_ids(deploy.tokenizer)
    ids = [prompt_ids(deploy.tokenizer, p) for p in (list(prompts) or VALIDATION_PROMPTS)]
    rows, notes = [], []
    cases = [("batch 1", ids[:1]), (f"batch {len(ids)} (left-padded)", ids)]
    if routing_modes(deploy) & set(CACHE_INCONSISTENT):
        # their mixing vector averages padding rows too, whose hidden states each runtime may compute
        # differently (they are masked out of attention): only an unpadded batch has one right answer
        notes.append("batch/sample routing averages over padding: validated on an unpadded batch only")
        cases = cases[:1]
    for label, batch in cases:
        ref_tokens, ref_steps = decode(reference, batch, new_tokens, None, pad, record_logits=True)
        got_tokens, got_steps = decode(candidate, batch, new_tokens, None, pad, record_logits=True)
        for kind, steps in (("prefill", slice(0, 1)), ("decode", slice(1, None))):
            diffs = [np.abs(g - r) for g, r in zip(got_steps[steps], ref_steps[steps])]
            if not diffs:
                continue
            worst = max(float(d.max()) for d in diffs)
            rel = max(float((d / np.maximum(np.abs(r), 1e-6)).max()) for d, r in zip(diffs, ref_steps[steps]))
            agree = float(np.mean([(g.argmax(-1) == r.argmax(-1)).mean()
                                   for g, r in zip(got_steps[steps], ref_steps[steps])]))
            rows.append(Comparison(OUTPUT_NAME, f"{label}, {kind}", worst, rel, agree, atol))
        if got_tokens != ref_tokens:
            notes.append(f"{label}: greedy tokens differ from torch ({got_tokens} vs {ref_tokens})")
    return rows, [n for n in notes if "differ" in n], \
        f"{len(ids)} prompts x {new_tokens} new tokens, " + ("alone and as a left-padded batch" if len(cases) > 1
                                                             else "one unpadded prompt: " + notes[0])
