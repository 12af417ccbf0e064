"""The runtime layer: every backend behind one :class:`Runner` interface.

Export validation, quantize validation, parity and bench all run models through this layer,
so they measure under the same settings: :func:`~lily_deploy.runtime.ort.ort_session` is the
one place an onnxruntime session is made, :mod:`~lily_deploy.runtime.onnx_io` the one ONNX
loader and atomic writer, and :func:`open_runner` picks the runner for a file or folder.

Submodules import their back end lazily: importing this package needs neither onnxruntime,
torch nor TensorRT.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, runtime_checkable

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


@runtime_checkable
class Runner(Protocol):
    """A model on one backend: named inputs in, named numpy outputs out."""

    backend: str  # torch-cpu, torch-cuda, onnxruntime-cpu, onnxruntime-cuda, tensorrt
    input_names: list[str]
    output_names: list[str]

    @property
    def name(self) -> str: ...

    def infer(self, feeds: Mapping[str, object]) -> dict:
        """Run once on ``{input name: array or tensor}``; return ``{output name: numpy array}``."""

    def bind(self, feeds: Mapping[str, object]) -> Callable[[], None]:
        """A zero-argument call that runs the model on ``feeds`` prepared once (for timing)."""


def cuda_available() -> bool:
    """Whether a CUDA GPU is visible (through torch, which every GPU user of this tool has)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def split_adapter_spec(spec: str | os.PathLike) -> tuple[str, Optional[str]]:
    """``base.onnx+task.onnx_adapter`` -> ``("base.onnx", "task.onnx_adapter")``; any other spec -> ``(spec, None)``.

    A switchable graph (or engine) with the ONNX Runtime adapter file it runs with.
    """
    text = str(spec)
    head, plus, tail = text.rpartition("+")
    if plus and head and tail.lower().endswith(".onnx_adapter") and not Path(text).exists():
        return head, tail
    return text, None


def kind_of(path: str | os.PathLike) -> str:
    """``onnx``, ``engine`` or ``torch`` (a model folder or a base model name) for a model spec."""
    suffix = Path(split_adapter_spec(path)[0]).suffix.lower()
    return "onnx" if suffix == ".onnx" else "engine" if suffix in ENGINE_SUFFIXES else "torch"


def open_runner(spec: str | os.PathLike, threads: Optional[int] = None, cuda: bool = False,
                base: Optional[str] = None, flag: Optional[str] = None) -> Runner:
    """The runner for an ONNX file (onnxruntime), an engine (TensorRT) or a model folder/name (torch).

    A switchable graph or engine takes its adapter as ``base.onnx+task.onnx_adapter``.
    """
    kind = kind_of(spec)
    if kind == "onnx":
        from .ort import CPU, CUDA, OrtRunner

        return OrtRunner(spec, threads, CUDA if cuda else CPU, flag=flag)
    if kind == "engine":
        from .tensorrt import TrtRunner

        base_spec, adapter = split_adapter_spec(spec)
        return TrtRunner(base_spec, adapter=adapter)
    from ..core.deploy import open_model
    from .torch_runner import TorchRunner

    return TorchRunner(open_model(spec, base=base), Path(str(spec)).name or str(spec),
                       "cuda" if cuda else "cpu")


__all__ = ["Runner", "open_runner", "kind_of", "split_adapter_spec", "cuda_available", "ENGINE_SUFFIXES"]
