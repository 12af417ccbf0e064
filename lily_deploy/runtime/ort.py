"""onnxruntime in the runtime layer: the ONE place a session is created, and its runner.

Export validation, quantize validation, calibration probes, parity and bench all measure under
the same settings: idle threads sleep instead of spinning (``session.intra_op.allow_spinning=0``)
so they do not steal the CPU from torch or from the next runner, and graph optimisation is at
``ORT_ENABLE_ALL`` (Q/DQ pairs become int8 kernels at EXTENDED or higher, as deployment runs them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..core.errors import LilyDeployError

# onnxruntime's type strings -> numpy dtypes
NP_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(bool)": np.bool_,
             "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
CPU = ("CPUExecutionProvider",)
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
OPT_LEVELS = ("disable", "basic", "extended", "all")


def ort_session(source: str | os.PathLike | bytes, threads: Optional[int] = None, opt_level: str = "all",
                providers: Sequence[str] = CPU, flag: Optional[str] = None, config: Optional[dict] = None):
    """An ``onnxruntime.InferenceSession`` for a path or serialized model, with the project's settings.

    ``config``: extra session config entries (e.g. ``{"session.qdqisint8allowed": "1"}``).
    A model onnxruntime cannot load (unknown op, bad graph, missing ``.data``) is a
    :class:`LilyDeployError` naming ``flag`` and the file.
    """
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise ValueError(f"opt_level {opt_level!r}: choose one of {', '.join(OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, str(value))
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    model = source if isinstance(source, bytes) else str(source)
    try:
        return ort.InferenceSession(model, so, providers=list(providers))
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph / NotImplemented / NoSuchFile
        where = "the model" if isinstance(source, bytes) else str(source)
        where = f"{flag} {where}" if flag else where
        first = (str(exc).splitlines() or [""])[0][:300]
        raise LilyDeployError(f"{where}: onnxruntime cannot load it ({first})") from None


def as_numpy(value) -> np.ndarray:
    """A numpy view of a numpy array or a (CPU) torch tensor."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class OrtRunner:
    """An ONNX file on onnxruntime, behind the :class:`~lily_deploy.runtime.Runner` interface."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None, providers: Sequence[str] = CPU,
                 opt_level: str = "all", flag: Optional[str] = None):
        self.path = Path(path)
        self.session = ort_session(self.path, threads, opt_level, providers, flag)
        active = self.session.get_providers()
        self.backend = "onnxruntime-cuda" if "CUDAExecutionProvider" in active else "onnxruntime-cpu"
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        self.input_names = [i.name for i in ins]
        self.output_names = [o.name for o in outs]
        self.input_types = {i.name: i.type for i in ins}
        self.input_dtypes = {i.name: NP_DTYPES.get(i.type) for i in ins}
        self.input_shapes = {i.name: list(i.shape or []) for i in ins}
        self.output_shapes = {o.name: list(o.shape or []) for o in outs}

    @property
    def name(self) -> str:
        return self.path.name

    def feeds(self, feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
        """``feeds`` restricted to the model's inputs, as contiguous arrays of the dtypes it takes."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise LilyDeployError(f"{self.path}: needs input {missing[0]!r}, which was not given "
                                  f"(given: {', '.join(feeds) or 'nothing'})")
        return {n: np.ascontiguousarray(as_numpy(feeds[n]).astype(self.input_dtypes[n] or np.int64, copy=False))
                for n in self.input_names}

    def infer(self, feeds: Mapping[str, object], outputs: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        names = list(outputs or self.output_names)
        return dict(zip(names, self.session.run(names, self.feeds(feeds))))

    def bind(self, feeds: Mapping[str, object]) -> Callable[[], None]:
        prepared = self.feeds(feeds)
        names = self.output_names
        return lambda: self.session.run(names, prepared)
