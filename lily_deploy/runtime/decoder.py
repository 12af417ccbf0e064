"""Decoders in the runtime layer: one step interface for cached generation on every backend.

A decoder step takes the new tokens ``input_ids [B, T]``, the attention mask over past and new
tokens ``[B, P + T]`` and their ``position_ids [B, T]``, plus the cache from the previous step,
and returns the logits of the new tokens ``[B, T, V]`` and the new cache. The cache holds the
keys and values AND the Lily routing state of every ``prompt``/``causal`` layer (the state
travels like the KV cache; see ``lily_deploy.core.lily``). :class:`TorchDecoder` runs a deploy
model in torch; the ONNX decoder runner lives in :mod:`lily_deploy.runtime.decoder_ort`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import numpy as np

from ..core.errors import LilyDeployError
from ..core.models import forward_with_cache
from ..core.modes import CACHE_INCONSISTENT, STATE_MODES


@dataclass
class DecoderCache:
    """What one step hands the next: keys/values (backend-specific), routing state, past length."""

    kv: Any = None
    routing: dict = field(default_factory=dict)
    length: int = 0


class Decoder(Protocol):
    """A causal LM that decodes step by step with a cache (torch, onnxruntime or TensorRT)."""

    backend: str
    name: str
    vocab_size: int

    def start(self, batch: int) -> DecoderCache:
        """An empty cache for ``batch`` sequences (past length 0)."""

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: DecoderCache) -> tuple[np.ndarray, DecoderCache]:
        """Logits of the new tokens ``[B, T, V]`` (float32) and the cache after them."""


def routing_modes(model) -> set[str]:
    """The routing modes of a deploy model's dynamic layers."""
    return {layer.mode for layer in model.layers.values() if layer.mode != "static"}


def single_routing(model) -> Optional[str]:
    """The one routing mode of every dynamic layer (as loaded: the one it was trained with), else None."""
    modes = routing_modes(model)
    return modes.pop() if len(modes) == 1 else None


def check_cache_consistent(modes: set[str], where: str, allow: bool = False) -> None:
    """Refuse (unless ``allow``) routing whose mixing vector changes as tokens are generated."""
    bad = sorted(set(modes) & set(CACHE_INCONSISTENT))
    if bad and not allow:
        raise LilyDeployError(
            f"{where}: {bad[0]} routing is not exact under a KV cache (its mixing vector averages over tokens that "
            "change as tokens are generated, so cached keys and values go stale); route by prompt, causal or token "
            "(--routing), or allow it for a comparison (--allow-inconsistent-routing)")


class TorchDecoder:
    """A causal-LM :class:`~lily_deploy.core.deploy.LilyDeployModel` decoding in torch with a DynamicCache."""

    def __init__(self, model, name: str = "torch", allow_inconsistent_routing: bool = False):
        if model.task != "causal-lm":
            raise LilyDeployError(f"{name}: a {model.task} model cannot generate; generation needs a causal LM")
        check_cache_consistent(routing_modes(model), name, allow_inconsistent_routing)
        self.model = model.eval()
        self.name = name
        self.backend = "torch-cpu"
        self.vocab_size = int(model.model.config.vocab_size)
        self.max_positions = getattr(model.model.config, "max_position_embeddings", None)

    def start(self, batch: int) -> DecoderCache:
        return DecoderCache()

    def step(self, input_ids, attention_mask, position_ids, cache: DecoderCache,
             prompt_mask: Optional[np.ndarray] = None) -> tuple[np.ndarray, DecoderCache]:
        """One cached step; ``prompt_mask`` (full forwards only) marks the prompt tokens for ``prompt`` routing."""
        import torch

        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        pos = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
        ctx = self.model.context
        ctx.mask = mask[:, -ids.shape[1]:]
        ctx.prompt_mask = None if prompt_mask is None else torch.as_tensor(np.asarray(prompt_mask))
        ctx.past, ctx.present = dict(cache.routing), {}
        try:
            with torch.inference_mode():
                out, kv = forward_with_cache(self.model.model, cache.kv, input_ids=ids, attention_mask=mask,
                                             position_ids=pos)
            routing = {k: v for k, v in ctx.present.items()}
        finally:
            ctx.mask, ctx.prompt_mask, ctx.past, ctx.present = None, None, {}, {}
        return out.logits.float().numpy(), DecoderCache(kv, routing, cache.length + ids.shape[1])


def state_layers(model) -> list[str]:
    """The module paths of the layers that carry a routing state, in traversal order."""
    return [name for name, layer in model.layers.items() if layer.mode in STATE_MODES]
