"""Router statistics: how much each layer's mixing vector varies across real samples.

A layer whose mixing vectors barely move is a candidate to fold (its HP mix is effectively
static); one whose vectors spread is routing for real and stays dynamic. The vectors are those
a routing mode mixes by: per sample (``sample``, the default, also for encoders routed by
``batch`` or ``token``), or for a decoder per prompt (``prompt``), per token's running mean
(``causal``) or per token (``token``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from ..converters.hpmix import mixing_vectors

STAT_MODES = ("sample", "prompt", "causal", "token")


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p.clamp_min(1e-12).log() * p).sum(-1)


def routing_vectors(logits: torch.Tensor, mask: Optional[torch.Tensor], prompt_mask: Optional[torch.Tensor],
                    routing: str = "sample") -> torch.Tensor:
    """The mixing vectors ``[N, E]`` a routing mode computes from router ``logits [B, T, E]``.

    ``mask`` marks the non-padding tokens, ``prompt_mask`` the prompt tokens (None: every
    non-padding token, as the layer does). A ``prompt`` vector is the mean over a sample's
    prompt tokens, as ``core.lily.hp_mix_stateful`` computes it; a sample with no prompt token
    has no vector. ``causal`` and ``token`` give one vector per non-padding token.
    """
    if routing == "sample" or logits.dim() != 3:
        p = mixing_vectors(logits, mask, "sample")
        return p.reshape(-1, p.shape[-1])
    probs = F.softmax(logits, dim=-1)
    valid = torch.ones(probs.shape[:2], dtype=torch.bool, device=probs.device) if mask is None else mask.bool()
    if routing == "prompt":
        weights = (valid if prompt_mask is None else prompt_mask.bool()).to(probs.dtype).unsqueeze(-1)
        count = weights.sum(dim=1)  # [B, 1]
        p = (probs * weights).sum(dim=1) / count.clamp_min(1.0)
        return p[count.squeeze(-1) > 0]
    if routing == "causal":
        weights = valid.to(probs.dtype).unsqueeze(-1)
        running = torch.cumsum(probs * weights, dim=1) / torch.cumsum(weights, dim=1).clamp_min(1.0)
        return running[valid]
    if routing == "token":
        return probs[valid]
    raise ValueError(f"no router statistics for routing {routing!r}; expected one of {', '.join(STAT_MODES)}")


def prompt_mask_for(layer, h: torch.Tensor) -> Optional[torch.Tensor]:
    """The context's prompt mask when it lines up with this layer's tokens (as the layer checks it), else None."""
    prompt = layer.context.prompt_mask
    return prompt if prompt is not None and tuple(prompt.shape) == tuple(h.shape[:2]) else None


@torch.no_grad()
def collect(model, batches: Iterable, routing: str = "sample",
            run: Optional[Callable[[Any], Any]] = None) -> dict[str, dict]:
    """Per adapted layer: mean mixing vector, its spread across vectors, entropies.

    ``routing`` picks the vectors (see :func:`routing_vectors`); the default, per sample over
    non-padding tokens whatever mode the layers are in, does not depend on how the data was
    batched. ``run(batch)`` runs the model on one batch (default ``model(**batch)``); a decoder's
    calibration sets the prompt mask on the model's routing context there.
    """
    run = run or (lambda batch: model(**batch))
    layers = model.layers
    per_layer: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = []
    for name, layer in layers.items():
        def hook(mod, args, out, name=name, layer=layer):
            h = args[0]
            p = routing_vectors(out.float(), layer.mask_for(h), prompt_mask_for(layer, h), routing)
            per_layer[name].append(p.cpu())
        hooks.append(layer.router.register_forward_hook(hook))
    try:
        for batch in batches:
            run(batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: summarize(torch.cat(chunks)) for name, chunks in per_layer.items()
            if chunks and sum(c.shape[0] for c in chunks)}


def summarize(p: torch.Tensor) -> dict:
    """The statistics of mixing vectors ``p [N, E]``."""
    mean = p.mean(0)
    std = p.std(0, unbiased=False) if p.shape[0] > 1 else torch.zeros_like(mean)
    return {
        "samples": int(p.shape[0]),
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "spread": float(std.max()),
        "l1_dev": float((p - mean).abs().sum(-1).mean()),
        "entropy_of_mean": float(entropy(mean)),
        "mean_entropy": float(entropy(p).mean()),
        "max_entropy": math.log(p.shape[-1]),
    }
