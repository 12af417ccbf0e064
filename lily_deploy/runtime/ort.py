"""onnxruntime in the runtime layer: the ONE place a session is created, and its runner.

Export validation, quantize validation, calibration probes, parity and bench all measure under
the same settings: the intra-op threads spin while a run lasts and stop when it returns
(``session.intra_op.allow_spinning=1`` with ``session.force_spinning_stop=1``), so a graph of many
small ops does not pay a thread wake-up per op, yet idle sessions do not steal the CPU from torch
or from the next runner; graph optimisation is at ``ORT_ENABLE_ALL`` (Q/DQ pairs become int8
kernels at EXTENDED or higher, as deployment runs them).
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
# switchable graphs (lily_deploy.switchable): adapter tensors are inputs named ADAPTER_PREFIX...,
# listed in the graph's ADAPTER_META metadata; an adapter is an ONNX Runtime adapter file
ADAPTER_META = "lily_deploy.switchable"
ADAPTER_PREFIX = "adapter."
ADAPTER_SUFFIX = ".onnx_adapter"
# threads spin during a run, so the many small ops of a dynamic Lily graph pay no thread wake-up each,
# and stop at its end (threads left spinning after a run slow the next session on a 2-core machine).
# benchmarks/ort_spinning.py, MiniLM, 2 threads, batch 1: every graph 4-10% faster than with spinning off,
# Lily / base 1.047 raw and 1.070 fused against 1.083 and 1.104
SPIN_IN_RUN = {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}


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
    for key, value in SPIN_IN_RUN.items():
        so.add_session_config_entry(key, value)
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


def base_tag(base_sha256: str) -> int:
    """The base-weights hash as the adapter format's ``model_version`` (an int): its first 28 bits."""
    return int(base_sha256[:7], 16)


def check_adapter_fit(shapes: Mapping[str, Sequence[int]], info: Mapping, tag: Optional[int], where: str,
                      graph: str) -> None:
    """An adapter's tensors must be exactly the graph's (names, shapes) and made for its base weights."""
    want = {n: list(v["shape"]) for n, v in (info.get("tensors") or {}).items()}
    for name in want:
        if name not in shapes:
            raise LilyDeployError(f"{where}: has no tensor {name}, which {graph} switches (other targets, "
                                  "LP stride or head?)")
    for name, shape in shapes.items():
        if name not in want:
            raise LilyDeployError(f"{where}: tensor {name} is not an adapter input of {graph}")
        if list(shape) != want[name]:
            raise LilyDeployError(f"{where}: tensor {name} has shape {list(shape)}, {graph} needs {want[name]}")
    if tag is not None and int(tag) != int(info.get("base_tag", -1)):
        raise LilyDeployError(f"{where}: made for other base weights (base tag {tag:07x}) than {graph} "
                              f"({int(info.get('base_tag', 0)):07x}, base {info.get('base_model')})")


class OrtAdapter:
    """An ``.onnx_adapter`` file loaded once: its tensors' shapes and its ``RunOptions`` activating it."""

    def __init__(self, path: str | os.PathLike, flag: Optional[str] = None):
        import onnxruntime as ort

        self.path = Path(path)
        where = f"{flag} {self.path}" if flag else str(self.path)
        if not self.path.is_file():
            raise LilyDeployError(f"{where}: no such adapter file")
        try:
            fmt = ort.AdapterFormat.read_adapter(str(self.path.resolve()))
            self.shapes = {n: list(v.shape()) for n, v in fmt.get_parameters().items()}
            self.tag = int(fmt.get_model_version())
            self.lora = ort.LoraAdapter()
            self.lora.Load(str(self.path.resolve()))
        except RuntimeError as exc:  # flatbuffer verification: truncated, damaged or not an adapter at all
            why = str(exc).strip().splitlines()[-1].split(") ")[-1][:160]
            raise LilyDeployError(f"{where}: not a readable ONNX Runtime adapter file ({why})") from None
        self.run_options = ort.RunOptions()
        self.run_options.add_active_adapter(self.lora)

    @property
    def name(self) -> str:
        return self.path.name

    def arrays(self) -> dict[str, np.ndarray]:
        """The adapter's tensors as numpy arrays (copies), e.g. to bind them to a TensorRT engine."""
        import onnxruntime as ort

        fmt = ort.AdapterFormat.read_adapter(str(self.path.resolve()))
        return {n: np.array(v.numpy(), copy=True) for n, v in fmt.get_parameters().items()}


class OrtRunner:
    """An ONNX file on onnxruntime, behind the :class:`~lily_deploy.runtime.Runner` interface.

    ``path`` may be ``base.onnx+task.onnx_adapter`` (or ``adapter`` given): a switchable graph run
    with that adapter; :meth:`infer` and :meth:`bind` take ``adapter=`` to choose one per call.
    """

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None, providers: Sequence[str] = CPU,
                 opt_level: str = "all", flag: Optional[str] = None, adapter=None):
        from . import split_adapter_spec

        path, spec_adapter = split_adapter_spec(path)
        self.path = Path(path)
        self.session = ort_session(self.path, threads, opt_level, providers, flag)
        self.adapter_info = _switchable_info(self.session)
        self.adapter: Optional[OrtAdapter] = None
        if adapter is not None or spec_adapter is not None:
            self.use_adapter(adapter if adapter is not None else spec_adapter, flag)
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
        return self.path.name if self.adapter is None else f"{self.path.name}+{self.adapter.name}"

    def load_adapter(self, adapter, flag: Optional[str] = None) -> OrtAdapter:
        """An :class:`OrtAdapter` (or a path to one) checked to fit this graph."""
        if not isinstance(adapter, OrtAdapter):
            adapter = OrtAdapter(adapter, flag)
        if self.adapter_info is None:
            raise LilyDeployError(f"{self.path}: not a switchable graph, so it takes no adapter "
                                  f"({adapter.path}); export it with --switchable")
        check_adapter_fit(adapter.shapes, self.adapter_info, adapter.tag, f"adapter {adapter.path}", str(self.path))
        return adapter

    def use_adapter(self, adapter, flag: Optional[str] = None) -> OrtAdapter:
        """Make ``adapter`` the one every later run uses (None: the graph's own defaults)."""
        self.adapter = None if adapter is None else self.load_adapter(adapter, flag)
        return self.adapter

    def _chosen(self, adapter) -> Optional[OrtAdapter]:
        """The adapter of this call; its RunOptions only point at its memory, so the caller holds it."""
        return self.adapter if adapter is None else self.load_adapter(adapter)

    def feeds(self, feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
        """``feeds`` restricted to the model's inputs, as contiguous arrays of the dtypes it takes."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise LilyDeployError(f"{self.path}: needs input {missing[0]!r}, which was not given "
                                  f"(given: {', '.join(feeds) or 'nothing'})")
        return {n: np.ascontiguousarray(as_numpy(feeds[n]).astype(self.input_dtypes[n] or np.int64, copy=False))
                for n in self.input_names}

    def infer(self, feeds: Mapping[str, object], outputs: Optional[Sequence[str]] = None,
              adapter=None) -> dict[str, np.ndarray]:
        """Run once; ``adapter`` (an :class:`OrtAdapter` or path) chooses the adapter for this call only."""
        names = list(outputs or self.output_names)
        chosen = self._chosen(adapter)
        options = chosen.run_options if chosen is not None else None
        return dict(zip(names, self.session.run(names, self.feeds(feeds), options)))

    def bind(self, feeds: Mapping[str, object], adapter=None) -> Callable[[], None]:
        prepared = self.feeds(feeds)
        names = self.output_names
        chosen = self._chosen(adapter)
        options = chosen.run_options if chosen is not None else None
        return lambda: (chosen, self.session.run(names, prepared, options))[1]


def _switchable_info(session) -> Optional[dict]:
    """The ``lily_deploy.switchable`` metadata of a session's graph (None: not a switchable graph)."""
    import json

    raw = session.get_modelmeta().custom_metadata_map.get(ADAPTER_META)
    try:
        info = json.loads(raw) if raw else None
    except ValueError:
        return None
    return info if isinstance(info, dict) else None
