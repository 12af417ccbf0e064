"""The ``lily::HPMix`` custom op, in one place.

HP mixing is the only part of Lily that is not a plain matmul: the router's softmax
probabilities are averaged into a mixing vector ``p`` (per batch, per sample or per
token), the shared HP pool is mixed by ``p``, and the low-rank hidden ``h`` is
projected through the mix. This module holds every form of that one computation:

* :func:`hp_mix_reference` -- differentiable torch, used for training and eager inference;
* ``torch.ops.lily.hp_mix`` -- the same as an opaque torch custom op (with a fake kernel),
  so the ONNX exporter sees ONE node per layer;
* the ONNX translation (a bare ``lily::HPMix`` node) and the FunctionProto bodies per
  routing mode, built from standard ops only (MatMul, Softmax, ReduceMean, ...; no Einsum),
  so onnxruntime and TensorRT's parser run it by inlining;
* the TensorRT plugin attributes for the optional plugin route.

Shapes: ``h [..., r]``, ``logits [..., E]``, HP pool ``hp [E*r, d_out]`` (PEFT's layout of
``lily_B.weight``), optional ``mask [B, T]``; output ``[..., d_out]`` already scaled.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

MODES = ("batch", "sample", "token", "static")
DYNAMIC_MODES = ("batch", "sample", "token")
DOMAIN = "lily"
OP_TYPE = "HPMix"
DOMAIN_VERSION = 1


def mixing_vectors(logits: torch.Tensor, mask: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    """The mixing vector(s) ``p`` of a routing mode.

    batch: ``[E]`` (mean over every row of the batch, padding included, as PEFT does);
    sample: ``[B, E]`` (mean over each sample's tokens, non-padding only when ``mask`` is
    given; a 2-D input is one token per sample); token: ``[..., E]`` (softmax per row).
    """
    probs = F.softmax(logits, dim=-1)
    num_hp = logits.shape[-1]
    if mode == "batch":
        return probs.reshape(-1, num_hp).mean(dim=0)
    if mode == "token" or logits.dim() == 2:
        return probs
    if mode == "sample":
        probs3 = probs.reshape(probs.shape[0], -1, num_hp)
        if mask is None:
            return probs3.mean(dim=1)
        weights = mask.to(probs.dtype).reshape(probs.shape[0], -1, 1)
        return (probs3 * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    raise ValueError(f"unknown routing mode {mode!r}; expected one of {', '.join(DYNAMIC_MODES)}")


def mix_pool(p: torch.Tensor, hp: torch.Tensor, rank: int) -> torch.Tensor:
    """``B~ = sum_e p_e HP_e``: ``p [..., E]`` and ``hp [E*r, d]`` give ``[..., r, d]``."""
    num_hp = p.shape[-1]
    flat = p @ hp.reshape(num_hp, -1)
    return flat.reshape(*p.shape[:-1], rank, hp.shape[-1])


def hp_mix_reference(
    h: torch.Tensor,
    logits: torch.Tensor,
    hp: torch.Tensor,
    mask: Optional[torch.Tensor],
    mode: str,
    scale: float,
) -> torch.Tensor:
    """``s * h @ B~(p)`` for one routing mode, in differentiable torch."""
    rank = h.shape[-1]
    num_hp = logits.shape[-1]
    if mode == "batch":
        return (h @ mix_pool(mixing_vectors(logits, None, "batch"), hp, rank)) * scale
    if mode == "token" or (mode == "sample" and h.dim() == 2):
        probs = F.softmax(logits, dim=-1)
        # sum_e P_e (h @ HP_e) == (P (x) h) @ HP: one matmul over the stacked pool.
        z = (probs.unsqueeze(-1) * h.unsqueeze(-2)).reshape(*h.shape[:-1], num_hp * rank)
        return (z @ hp) * scale
    if mode == "sample":
        p = mixing_vectors(logits, mask, "sample")  # [B, E]
        mixed = mix_pool(p, hp, rank)  # [B, r, d]
        h3 = h.reshape(h.shape[0], -1, rank)
        return torch.bmm(h3, mixed).reshape(*h.shape[:-1], hp.shape[-1]) * scale
    raise ValueError(f"unknown routing mode {mode!r}; expected one of {', '.join(DYNAMIC_MODES)}")


@torch.library.custom_op("lily::hp_mix", mutates_args=())
def hp_mix(
    h: torch.Tensor,
    logits: torch.Tensor,
    hp: torch.Tensor,
    mask: Optional[torch.Tensor],
    mode: str,
    scale: float,
) -> torch.Tensor:
    """Opaque form of :func:`hp_mix_reference` (what the exporter turns into ``lily::HPMix``)."""
    return hp_mix_reference(h, logits, hp, mask, mode, scale).contiguous()


@hp_mix.register_fake
def _hp_mix_fake(h, logits, hp, mask, mode, scale):
    return h.new_empty((*h.shape[:-1], hp.shape[-1]))
