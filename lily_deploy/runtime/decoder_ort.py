"""An exported Lily decoder (KV cache + routing state) on onnxruntime, behind the decoder step interface.

The graph's inputs say what the cache holds: ``past_key_values.{i}.key/.value [B, kv_heads,
P, head_dim]`` per attention layer and ``past_routing.{j} [B, E + 1]`` per ``prompt``/``causal``
Lily layer; its outputs ``present.*`` and ``present_routing.*`` become the next step's inputs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.errors import LilyDeployError
from .decoder import DecoderCache, check_cache_consistent
from .onnx_io import load_onnx, metadata, metadata_value
from .ort import CPU, NP_DTYPES, ort_session

KV_PREFIX, KV_OUT = "past_key_values.", "present."
STATE_PREFIX, STATE_OUT = "past_routing.", "present_routing."


class OrtDecoder:
    """A decoder graph exported by ``lily-deploy export`` (with its cache) on onnxruntime."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None, providers=CPU,
                 allow_inconsistent_routing: bool = False, flag: Optional[str] = None):
        self.path = Path(path)
        self.name = self.path.name
        model = load_onnx(self.path, flag=flag)
        self.meta = metadata(model)
        where = f"{flag} {self.path}" if flag else str(self.path)
        if metadata_value(self.meta, "lily_deploy.task") not in (None, "causal-lm"):
            raise LilyDeployError(f"{where}: a {metadata_value(self.meta, 'lily_deploy.task')} graph cannot generate; "
                                  "generation needs an exported causal LM")
        self.session = ort_session(self.path, threads, providers=providers, flag=flag)
        self.backend = "onnxruntime-cuda" if "CUDAExecutionProvider" in self.session.get_providers() \
            else "onnxruntime-cpu"
        ins = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(ins)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.kv_inputs = [n for n in ins if n.startswith(KV_PREFIX)]
        self.state_inputs = [n for n in ins if n.startswith(STATE_PREFIX)]
        if not self.kv_inputs or "attention_mask" not in ins:
            raise LilyDeployError(f"{where}: not a decoder graph with a KV cache (no past_key_values.* inputs); "
                                  "export it with lily-deploy export (without --no-cache)")
        routing = metadata_value(self.meta, "lily_deploy.routing")
        if routing in ("prompt", "causal") and not self.state_inputs:
            raise LilyDeployError(f"{where}: {routing} routing needs its routing state, but the graph has no "
                                  "past_routing.* inputs; re-export it with lily-deploy export")
        check_cache_consistent({routing} if routing else set(), where, allow_inconsistent_routing)
        self.routing = routing
        self._kv_shape = {n: list(ins[n].shape) for n in self.kv_inputs}
        self._kv_dtype = {n: NP_DTYPES.get(ins[n].type, np.float32) for n in self.kv_inputs}
        self._state_width = {n: int(ins[n].shape[-1]) for n in self.state_inputs}
        self.vocab_size = int(metadata_value(self.meta, "lily_deploy.vocab_size") or 0)
        self.max_positions = metadata_value(self.meta, "lily_deploy.max_positions")

    def start(self, batch: int) -> DecoderCache:
        kv = {}
        for n, shape in self._kv_shape.items():
            heads, dim = shape[1], shape[3]
            kv[n] = np.zeros((batch, int(heads), 0, int(dim)), self._kv_dtype[n])
        routing = {n: np.zeros((batch, w), np.float32) for n, w in self._state_width.items()}
        return DecoderCache(kv, routing, 0)

    def step(self, input_ids, attention_mask, position_ids, cache: DecoderCache,
             prompt_mask: Optional[np.ndarray] = None) -> tuple[np.ndarray, DecoderCache]:
        if prompt_mask is not None:
            raise LilyDeployError(f"{self.path}: an exported decoder finds its prompt from the cache; a full forward "
                                  "with an explicit prompt mask runs in torch")
        feeds = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64),
                 **cache.kv, **cache.routing}
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.asarray(position_ids, np.int64)
        out = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        kv = {n: out[KV_OUT + n[len(KV_PREFIX):]] for n in self.kv_inputs}
        routing = {n: out[STATE_OUT + n[len(STATE_PREFIX):]] for n in self.state_inputs}
        logits = out["logits"].astype(np.float32, copy=False)
        return logits, DecoderCache(kv, routing, cache.length + np.shape(input_ids)[1])
