"""Router statistics: how much each layer's mixing vector varies across real samples.

A layer whose per-sample mixing vectors barely move is a candidate to fold (its HP mix is
effectively static); one whose vectors spread is routing for real and stays dynamic.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..converters.hpmix import mixing_vectors


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p.clamp_min(1e-12).log() * p).sum(-1)


@torch.no_grad()
def collect(model, batches: Iterable[dict]) -> dict[str, dict]:
    """Per adapted layer: mean mixing vector, its spread across samples, entropies.

    Vectors are per sample over non-padding tokens (the ``sample`` routing mode), whatever
    mode the layers are in, so the statistics do not depend on how the data was batched.
    """
    layers = model.layers
    per_layer: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = []
    for name, layer in layers.items():
        def hook(mod, args, out, name=name, layer=layer):
            h = args[0]
            mask = layer.mask_for(h)
            p = mixing_vectors(out.float(), mask, "sample")
            per_layer[name].append(p.reshape(-1, p.shape[-1]).cpu())
        hooks.append(layer.router.register_forward_hook(hook))
    samples = 0
    try:
        for batch in batches:
            model(**batch)
            samples += next(iter(batch.values())).shape[0]
    finally:
        for h in hooks:
            h.remove()
    stats = {}
    for name, chunks in per_layer.items():
        if not chunks:
            continue
        p = torch.cat(chunks)  # [N, E]
        mean = p.mean(0)
        std = p.std(0, unbiased=False) if p.shape[0] > 1 else torch.zeros_like(mean)
        stats[name] = {
            "samples": int(p.shape[0]),
            "mean": [round(float(v), 6) for v in mean],
            "std": [round(float(v), 6) for v in std],
            "spread": float(std.max()),
            "l1_dev": float((p - mean).abs().sum(-1).mean()),
            "entropy_of_mean": float(entropy(mean)),
            "mean_entropy": float(entropy(p).mean()),
            "max_entropy": math.log(p.shape[-1]),
        }
    return stats
