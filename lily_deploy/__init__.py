"""lily-deploy: Lily adapters from fine-tuning to ONNX, TensorRT and proven parity.

The Python API mirrors the commands; each name is imported on first use, so
``import lily_deploy`` stays light and needs no optional back end::

    from . import finetune, fold, export, quantize, build_trt, parity, bench, inspect
"""
from __future__ import annotations

import importlib

from .core import __version__  # noqa: F401

# public name -> (module, attribute); the modules are named for what they hold, the API for the command
_API = {
    "finetune": ("training", "finetune"),
    "fold": ("folding", "fold"),
    "export": ("onnx_export", "export_onnx"),
    "quantize": ("precision", "quantize"),
    "build_trt": ("trt_build", "build_engine"),
    "parity": ("parity_check", "run_parity"),
    "bench": ("benchmark", "run_bench"),
    "inspect": ("inspection", "describe"),
    "quickstart": ("pipeline", "quickstart"),
    "generate": ("generation", "generate"),
    "FinetuneConfig": ("training", "FinetuneConfig"),
    "FoldConfig": ("folding", "FoldConfig"),
    "ExportConfig": ("onnx_export", "ExportConfig"),
    "QuantizeConfig": ("precision", "QuantizeConfig"),
    "BuildConfig": ("trt_build", "BuildConfig"),
    "ParityConfig": ("parity_check", "ParityConfig"),
    "BenchConfig": ("benchmark", "BenchConfig"),
    "GenerateConfig": ("generation", "GenerateConfig"),
    "QuickstartConfig": ("pipeline", "QuickstartConfig"),
    "load_model": ("deploy", "load_model"),
    "save_deploy": ("deploy", "save_deploy"),
    "LilyLinear": ("lily", "LilyLinear"),
    "LilyDeployError": ("errors", "LilyDeployError"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
