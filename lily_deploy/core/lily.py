"""The deploy-time Lily layer.

:class:`LilyLinear` holds exactly what PEFT's Lily layer holds -- the frozen base Linear,
its low-rank projector (LP, shared by a group of adjacent layers), its own router, and a
reference to the HP pool shared by every layer of its target type -- but computes the HP
mixing in one of four routing modes (the torch math is below; the ONNX op is ``converters.hpmix``):

* ``batch``  -- PEFT's semantics: one mixing vector for the whole batch (padding included);
* ``sample`` -- one vector per sample over its non-padding tokens: batch- and padding-invariant;
* ``token``  -- one vector per token;
* ``static`` -- a frozen vector; folds exactly into the base weight;
* ``prompt`` -- (decoders) the mean over a sample's prompt tokens, frozen for every response token;
* ``causal`` -- (decoders) the running mean over a sample's tokens up to and including this one.

``prompt`` and ``causal`` are exact under a KV cache: each layer carries a routing state
``[B, E + 1]`` (the masked sum of router probabilities and the token count) from one decode step
to the next, as the KV cache carries keys and values, so a cached decode gives the logits of a
full forward over the whole sequence. The attention mask, the prompt mask and the routing state
reach the layers through a :class:`RoutingContext` shared by all layers of a model.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import torch.nn.functional as F

from .errors import LilyDeployError
from .modes import DYNAMIC_MODES, MODES, STATE_MODES


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
    if mode in STATE_MODES:  # a whole sequence from its start (training, full forwards): no past
        return hp_mix_stateful(h, logits, hp, mask, None, mode, scale)[0]
    raise ValueError(f"unknown routing mode {mode!r}; expected one of {', '.join(DYNAMIC_MODES + STATE_MODES)}")


def hp_mix_stateful(
    h: torch.Tensor,
    logits: torch.Tensor,
    hp: torch.Tensor,
    mask: Optional[torch.Tensor],
    past: Optional[torch.Tensor],
    mode: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s * h @ B~(p), present state)`` for the decoder modes ``prompt`` and ``causal``.

    ``h [B, T, r]``, ``logits [B, T, E]``; ``mask [B, T]`` marks the tokens that count (prompt:
    the prompt tokens; causal: the non-padding tokens; None: all); ``past [B, E+1]`` is the state
    after the tokens before these (None or zeros at prefill): the masked sum of router
    probabilities and the count. In ``prompt`` mode a sample whose past count is non-zero has
    seen its prompt, so its new tokens add nothing and the frozen mean is used.
    """
    probs = F.softmax(logits, dim=-1)
    batch, _, num_hp = probs.shape
    rank = h.shape[-1]
    m = (torch.ones(probs.shape[:2], dtype=probs.dtype, device=probs.device) if mask is None
         else mask.to(probs.dtype))
    if past is None:
        past = probs.new_zeros(batch, num_hp + 1)
    past = past.to(probs.dtype)
    past_sum, past_count = past[:, :num_hp], past[:, num_hp:]
    if mode == "prompt":
        m = m * (past_count <= 0).to(probs.dtype)  # [B, T]
        total = past_sum + (probs * m.unsqueeze(-1)).sum(dim=1)  # [B, E]
        count = past_count + m.sum(dim=1, keepdim=True)  # [B, 1]
        p = total / count.clamp_min(1.0)
        mixed = mix_pool(p * scale, hp, rank)  # [B, r, d]
        return torch.bmm(h, mixed), torch.cat([total, count], dim=-1)
    if mode == "causal":
        run_sum = past_sum.unsqueeze(1) + torch.cumsum(probs * m.unsqueeze(-1), dim=1)  # [B, T, E]
        run_count = past_count.unsqueeze(1) + torch.cumsum(m.unsqueeze(-1), dim=1)  # [B, T, 1]
        p = run_sum / run_count.clamp_min(1.0)
        z = ((p * scale).unsqueeze(-1) * h.unsqueeze(-2)).reshape(*h.shape[:-1], num_hp * rank)
        return z @ hp, torch.cat([run_sum[:, -1], run_count[:, -1]], dim=-1)
    raise ValueError(f"routing mode {mode!r} carries no state; expected one of {', '.join(STATE_MODES)}")


def _registered_op(name: str):
    try:
        return getattr(torch.ops.lily, name)
    except (AttributeError, RuntimeError):
        raise RuntimeError(f"lily::{name} is not registered: import lily_deploy.converters.hpmix before exporting") from None


def custom_op_mix(h, logits, hp, mask, mode: str, scale: float) -> torch.Tensor:
    """``torch.ops.lily.hp_mix``, looked up by name: the exporter registers it (``lily_deploy.converters.hpmix``)."""
    return _registered_op("hp_mix")(h, logits, hp, mask, mode, scale)


def custom_op_mix_stateful(h, logits, hp, mask, past, mode: str, scale: float):
    """``torch.ops.lily.hp_mix_state``: the decoder modes' op (see :func:`custom_op_mix`)."""
    return _registered_op("hp_mix_state")(h, logits, hp, mask, past, mode, scale)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise LilyDeployError(f"unknown routing mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


class RoutingContext:
    """Per-model state that routing needs but a Linear cannot see.

    ``mask``: the token mask of the tokens in this forward pass ``[B, T]``; ``prompt_mask``:
    which of them are prompt tokens (``prompt`` mode in training and in full forwards; None:
    every unmasked token of a pass with no past is prompt); ``past`` / ``present``: the routing
    state per layer (by its module path) before and after this pass, for ``prompt``/``causal``.
    ``use_custom_op`` makes every layer call the opaque ``lily::`` ops (set by the ONNX exporter)
    instead of the differentiable reference.
    """

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None
        self.prompt_mask: Optional[torch.Tensor] = None
        self.past: dict[str, torch.Tensor] = {}
        self.present: dict[str, torch.Tensor] = {}
        self.use_custom_op = False


class HPPool(nn.Module):
    """The ``E`` shared HP matrices of one target type, in PEFT's layout ``[E*r, d_out]``."""

    def __init__(self, num_hp: int, rank: int, out_features: int):
        super().__init__()
        self.num_hp, self.rank, self.out_features = num_hp, rank, out_features
        self.weight = nn.Parameter(torch.zeros(num_hp * rank, out_features))

    def extra_repr(self) -> str:
        return f"num_hp={self.num_hp}, rank={self.rank}, out_features={self.out_features}"


class LilyLinear(nn.Module):
    """``y = W0 x + b + s * h B~(p)`` with ``h = A x`` and ``p`` from the router's softmax."""

    def __init__(
        self,
        base: nn.Linear,
        lp: nn.Linear,
        router: nn.Linear,
        hp: HPPool,
        scale: float,
        mode: str = "batch",
        context: Optional[RoutingContext] = None,
    ):
        super().__init__()
        if lp.in_features != base.in_features or hp.out_features != base.out_features:
            raise LilyDeployError(
                f"adapter shapes do not fit the base Linear ({base.in_features} -> {base.out_features}): "
                f"LP takes {lp.in_features}, HP pool gives {hp.out_features}"
            )
        self.base = base
        self.lp = lp
        self.router = router
        self.hp = hp
        self.scale = float(scale)
        self.mode = check_mode(mode)
        self.context = context if context is not None else RoutingContext()
        self.state_key = ""  # module path, the key of this layer's routing state (set by set_routing)
        self.register_buffer("static_p", torch.full((hp.num_hp,), 1.0 / hp.num_hp), persistent=True)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def rank(self) -> int:
        return self.lp.out_features

    @property
    def num_hp(self) -> int:
        return self.hp.num_hp

    def set_static(self, p: torch.Tensor) -> None:
        """Freeze the mixing vector to ``p`` (e.g. the calibration mean) and switch to ``static``."""
        p = torch.as_tensor(p, dtype=self.static_p.dtype).reshape(-1)
        if p.numel() != self.num_hp:
            raise LilyDeployError(f"static mixing vector has {p.numel()} entries, layer has {self.num_hp} HPs")
        self.static_p.copy_(p)
        self.mode = "static"

    def delta_weight(self, p: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``s * (A^T B~(p))^T``: the ``[d_out, d_in]`` update a fixed ``p`` adds to ``W0``."""
        p = self.static_p if p is None else p
        mixed = mix_pool(p.to(self.hp.weight.dtype), self.hp.weight, self.rank)  # [r, d_out]
        return (self.lp.weight.t() @ mixed).t() * self.scale

    def folded_linear(self, p: Optional[torch.Tensor] = None) -> nn.Linear:
        """A plain Linear equal to this layer in ``static`` mode with vector ``p``."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        out = out.to(self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight(p).to(self.base.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out

    def mask_for(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """The context's token mask when it lines up with this layer's tokens, else None."""
        mask = self.context.mask
        if mask is None or h.dim() != 3 or mask.dim() != 2:
            return None
        if mask.shape[0] != h.shape[0] or mask.shape[1] != h.shape[1]:
            return None
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        h = self.lp(x.to(self.lp.weight.dtype))
        if self.mode == "static":
            delta = (h @ mix_pool(self.static_p.to(h.dtype), self.hp.weight, self.rank)) * self.scale
        elif self.mode in STATE_MODES:
            delta = self._stateful(h)
        else:
            logits = self.router(h)
            mask = self.mask_for(h) if self.mode == "sample" else None
            mix = custom_op_mix if self.context.use_custom_op else hp_mix_reference
            delta = mix(h, logits, self.hp.weight, mask, self.mode, self.scale)
        return result + delta.to(result.dtype)

    def _stateful(self, h: torch.Tensor) -> torch.Tensor:
        """``prompt`` / ``causal``: mix with the past routing state, record the present one."""
        if h.dim() != 3:
            raise LilyDeployError(f"{self.mode} routing needs [batch, sequence, features] inputs, got {list(h.shape)}")
        ctx = self.context
        mask = self.mask_for(h)
        if self.mode == "prompt" and ctx.prompt_mask is not None and ctx.prompt_mask.shape == h.shape[:2]:
            mask = ctx.prompt_mask
        past = ctx.past.get(self.state_key)
        if ctx.use_custom_op:
            if past is None:
                past = h.new_zeros(h.shape[0], self.num_hp + 1)
            delta, present = custom_op_mix_stateful(h, self.router(h), self.hp.weight, mask, past, self.mode,
                                                    self.scale)
        else:
            delta, present = hp_mix_stateful(h, self.router(h), self.hp.weight, mask, past, self.mode, self.scale)
        ctx.present[self.state_key] = present
        return delta

    def extra_repr(self) -> str:
        return f"rank={self.rank}, num_hp={self.num_hp}, scale={self.scale}, mode={self.mode}"


def lily_layers(model: nn.Module) -> dict[str, LilyLinear]:
    """Every LilyLinear of a model by its module path, in traversal order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LilyLinear)}


def set_routing(model: nn.Module, mode: str, include_static: bool = False) -> None:
    """Set the routing mode of every dynamic (or, with ``include_static``, every) LilyLinear."""
    check_mode(mode)
    for name, layer in lily_layers(model).items():
        layer.state_key = name
        if layer.mode != "static" or include_static:
            layer.mode = mode
