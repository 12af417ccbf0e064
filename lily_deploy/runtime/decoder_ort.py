"""An exported Lily decoder (KV cache + routing state) on onnxruntime, behind the decoder step interface.

The graph's inputs say what the cache holds: ``past_key_values.{i}.key/.value [B, kv_heads,
P, head_dim]`` per attention layer and ``past_routing.{j} [B, E + 1]`` per ``prompt``/``causal``
Lily layer; its outputs ``present.*`` and ``present_routing.*`` become the next step's inputs.
"""
from __future__ import annotations

import abc
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


class GraphDecoder(abc.ABC):
    """What every exported-decoder backend shares: the cache layout from the graph's I/O, start and step.

    Subclasses set ``input_names``, ``output_names``, ``meta``, ``kv_shapes`` (name -> shape with
    the fixed kv-heads and head-dim axes), ``state_widths`` and implement ``_run(feeds) -> dict``.
    """

    path: Path
    kv_dtype = np.float32

    def _layout(self, where: str, allow_inconsistent_routing: bool) -> None:
        self.kv_inputs = [n for n in self.input_names if n.startswith(KV_PREFIX)]
        self.state_inputs = [n for n in self.input_names if n.startswith(STATE_PREFIX)]
        if not self.kv_inputs or "attention_mask" not in self.input_names:
            raise LilyDeployError(f"{where}: not a decoder graph with a KV cache (no past_key_values.* inputs); "
                                  "export it with lily-deploy export (without --no-cache)")
        routing = metadata_value(self.meta, "lily_deploy.routing") if self.meta else None
        if routing in ("prompt", "causal") and not self.state_inputs:
            raise LilyDeployError(f"{where}: {routing} routing needs its routing state, but the graph has no "
                                  "past_routing.* inputs; re-export it with lily-deploy export")
        check_cache_consistent({routing} if routing else set(), where, allow_inconsistent_routing)
        self.routing = routing
        self.vocab_size = int(metadata_value(self.meta, "lily_deploy.vocab_size") or 0) if self.meta else 0
        self.max_positions = metadata_value(self.meta, "lily_deploy.max_positions") if self.meta else None

    def start(self, batch: int) -> DecoderCache:
        kv = {n: np.zeros((batch, int(shape[1]), 0, int(shape[3])), self.kv_dtype) for n, shape in self.kv_shapes.items()}
        routing = {n: np.zeros((batch, w), np.float32) for n, w in self.state_widths.items()}
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
        out = self._run(feeds)
        kv = {n: out[KV_OUT + n[len(KV_PREFIX):]] for n in self.kv_inputs}
        routing = {n: out[STATE_OUT + n[len(STATE_PREFIX):]] for n in self.state_inputs}
        logits = np.asarray(out["logits"], dtype=np.float32)
        return logits, DecoderCache(kv, routing, cache.length + np.shape(input_ids)[1])

    @abc.abstractmethod
    def _run(self, feeds: dict) -> dict:
        """Run the graph once on ``feeds``: ``{output name: array}`` (the backend's part)."""


class OrtDecoder(GraphDecoder):
    """A decoder graph exported by ``lily-deploy export`` (with its cache) on onnxruntime."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None, providers=CPU,
                 allow_inconsistent_routing: bool = False, flag: Optional[str] = None):
        self.path = Path(path)
        self.name = self.path.name
        model = load_onnx(self.path, flag=flag)
        self.meta = metadata(model)
        where = f"{flag} {self.path}" if flag else str(self.path)
        task = metadata_value(self.meta, "lily_deploy.task")
        if task not in (None, "causal-lm"):
            raise LilyDeployError(f"{where}: a {task} graph cannot generate; generation needs an exported causal LM")
        self.session = ort_session(self.path, threads, providers=providers, flag=flag)
        self.backend = "onnxruntime-cuda" if "CUDAExecutionProvider" in self.session.get_providers() \
            else "onnxruntime-cpu"
        ins = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(ins)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._layout(where, allow_inconsistent_routing)
        self.kv_shapes = {n: list(ins[n].shape) for n in self.kv_inputs}
        self.kv_dtype = NP_DTYPES.get(ins[self.kv_inputs[0]].type, np.float32)
        self.state_widths = {n: int(ins[n].shape[-1]) for n in self.state_inputs}

    def _run(self, feeds: dict) -> dict:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
