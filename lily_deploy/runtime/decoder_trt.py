"""An exported Lily decoder as a TensorRT engine (GPU only), behind the decoder step interface.

The engine built by ``build-trt`` from a decoder graph has a prefill profile (empty past) and a
decode profile (one new token); :class:`~lily_deploy.runtime.tensorrt.TrtRunner` picks the profile
from the input shapes. The cache layout comes from the engine's I/O, as for onnxruntime.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .decoder_ort import GraphDecoder
from .tensorrt import TrtRunner


class TrtDecoder(GraphDecoder):
    """A decoder engine (TensorRT or TensorRT for RTX) on the GPU."""

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, allow_inconsistent_routing: bool = False,
                 flag: Optional[str] = None):
        self.path = Path(path)
        self.name = self.path.name
        self.runner = TrtRunner(self.path)
        report = self.runner.report or {}
        onnx_meta = report.get("onnx") or {}
        # the build report keeps the graph's routing; the cache layout is in the engine's own shapes
        self.meta = {"lily_deploy.routing": onnx_meta.get("routing"), "lily_deploy.task": onnx_meta.get("task"),
                     "lily_deploy.base_model": onnx_meta.get("base_model")}
        self.input_names = list(self.runner.input_names)
        self.output_names = list(self.runner.output_names)
        where = f"{flag} {self.path}" if flag else str(self.path)
        self._layout(where, allow_inconsistent_routing)
        engine = self.runner.engine
        self.kv_shapes = {n: list(engine.get_tensor_shape(n)) for n in self.kv_inputs}
        self.state_widths = {n: int(engine.get_tensor_shape(n)[-1]) for n in self.state_inputs}

    def _run(self, feeds: dict) -> dict:
        return self.runner.infer(feeds)
