"""TensorRT and TensorRT for RTX in the runtime layer: which backend is here, and running engines.

:func:`load_backend` imports a TensorRT flavour lazily (both are optional extras);
:class:`TrtRunner` is the engine's :class:`~lily_deploy.runtime.Runner` (what ``parity``,
``bench`` and the Python API use).

An engine runs only on the TensorRT version that built it and on the GPUs it was built for.
Before deserializing, the runner reads the build report beside the engine (``ENGINE.json``)
and refuses a mismatch with a message that says what was built for what; TensorRT's own
validity check (where the backend has one) backs it up. Inputs go to device buffers (torch
CUDA tensors) on the runner's CUDA stream; the optimization profile is picked from the input
shapes; outputs come back as numpy arrays (or torch tensors on request).
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..core.errors import LilyDeployError
from . import cuda_available
from .ort import ADAPTER_PREFIX

BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}

INSTALL = {
    "tensorrt": "pip install 'lily-deploy[tensorrt]'",
    "tensorrt-rtx": "pip install 'lily-deploy[tensorrt-rtx]'",
}

PRETTY = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}

REPORT_SUFFIX = ".json"
# the first four bytes of a serialized plan, by flavour (checked without importing TensorRT)
ENGINE_MAGICS = {b"ftrt": "TensorRT", b"vtrt": "TensorRT-RTX"}


# ---------------------------------------------------------------------------------------
# backends: which TensorRT flavour is installed, and what it can target
# ---------------------------------------------------------------------------------------

@dataclass
class Backend:
    """An imported TensorRT flavour: its name, module and version."""

    name: str  # "tensorrt" or "tensorrt-rtx"
    trt: Any
    version: str

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    @property
    def pretty(self) -> str:
        return f"{PRETTY[self.name]} {self.version}"

    @property
    def has_precision_flags(self) -> bool:
        """TensorRT 10 still has FP16/INT8 builder flags; TensorRT 11 and RTX do not."""
        return hasattr(self.trt.BuilderFlag, "FP16")


def _import(name: str):
    import importlib

    try:
        return importlib.import_module(MODULES[name]), None
    except ImportError as exc:  # not installed, or its native libraries are missing
        return None, exc
    except OSError as exc:
        return None, exc


def load_backend(name: str = "auto") -> Backend:
    """Import the TensorRT flavour ``name`` (``auto``: TensorRT with a GPU, else TensorRT-RTX)."""
    if name not in BACKENDS:
        raise LilyDeployError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        order = ["tensorrt", "tensorrt-rtx"] if cuda_available() else ["tensorrt-rtx", "tensorrt"]
        for candidate in order:
            module, _ = _import(candidate)
            if module is not None:
                return Backend(candidate, module, module.__version__)
        raise LilyDeployError(
            "no TensorRT backend is installed: install TensorRT for RTX (builds without a GPU) with "
            f"{INSTALL['tensorrt-rtx']}, or TensorRT with {INSTALL['tensorrt']}"
        )
    module, exc = _import(name)
    if module is None:
        why = "is not installed" if isinstance(exc, ModuleNotFoundError) else f"cannot be imported ({exc})"
        raise LilyDeployError(f"--backend {name}: {PRETTY[name]} (module {MODULES[name]}) {why}; "
                              f"install it with {INSTALL[name]}")
    return Backend(name, module, module.__version__)


def rtx_targets(backend: Backend) -> list[str]:
    """The compute capabilities a TensorRT-RTX build can target (``sm75``, ..., ``sm121``)."""
    return sorted((n.lower() for n in dir(backend.trt.ComputeCapability) if re.fullmatch(r"SM\d+", n)),
                  key=lambda s: int(s[2:]))


def rtx_supports(backend: Backend, cc: str) -> bool:
    """Whether TensorRT-RTX can build for and run on compute capability ``cc`` (e.g. ``sm90``: no)."""
    return cc.lower() in rtx_targets(backend)


def make_logger(trt, verbose: bool = False):
    class CollectingLogger(trt.ILogger):
        """Keeps TensorRT's errors for our one-line messages; prints only with --verbose."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []
            self.verbose = verbose

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(msg)
            if self.verbose and severity <= trt.ILogger.Severity.INFO:
                print(f"[{str(severity).split('.')[-1]}] {msg}", file=sys.stderr)

    return CollectingLogger()


def report_path(engine: str | os.PathLike) -> Path:
    return Path(str(engine) + REPORT_SUFFIX)


def check_engine_header(path: str | os.PathLike, where: str) -> str:
    """The TensorRT flavour whose plan magic ``path`` starts with; any other file is refused in one line.

    Decided before any skip: without a GPU an engine is skipped, but random bytes named ``.plan``
    are an error wherever they are.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise LilyDeployError(f"{where}: cannot read it ({exc.strerror})") from None
    flavour = ENGINE_MAGICS.get(head)
    if flavour is None:
        raise LilyDeployError(f"{where}: not a TensorRT engine (it starts with {head.hex() or 'nothing'}; a "
                              "TensorRT plan starts with 'ftrt', a TensorRT-RTX plan with 'vtrt')")
    return flavour


def read_report(engine: str | os.PathLike) -> Optional[dict]:
    """The build report beside ``engine`` (None if there is none); a malformed one is one line naming the field."""
    from ..core import schema

    path = report_path(engine)
    if not path.is_file():
        return None
    report = schema.read_json(path, schema.BUILD_REPORT, "build report")
    schema.check_tensors(report, str(path))
    return report


# ---------------------------------------------------------------------------------------
# running engines
# ---------------------------------------------------------------------------------------

_TORCH_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
    "INT64": "int64", "BOOL": "bool", "UINT8": "uint8",
}


def _fmt(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def check_compatible(report: dict, backend: str, version: str, device_cc: str, device_name: str = "this GPU",
                     engine: str = "the engine") -> None:
    """Refuse an engine built by another backend/version or for another GPU, naming both sides.

    ``device_cc`` is like ``sm89``. Pure: it only compares the report with what is here.
    """
    built = report.get("backend", {})
    b_name, b_version = built.get("name"), built.get("version")
    if b_name and b_name != backend:
        raise LilyDeployError(f"{engine} was built with {PRETTY.get(b_name, b_name)} {b_version}; "
                              f"{PRETTY.get(backend, backend)} cannot run it (use --backend {b_name})")
    if b_version and b_version != version:
        pkg = "tensorrt-rtx-cu12" if backend == "tensorrt-rtx" else "tensorrt"
        raise LilyDeployError(
            f"{engine} was built with {PRETTY.get(b_name, b_name)} {b_version}, this machine has {version}: an engine "
            f"runs only on the version that built it; rebuild it here with lily-deploy build-trt, "
            f"or install {pkg}=={b_version}")
    targets = [str(t).lower() for t in report.get("target", {}).get("compute_capabilities") or []]
    if targets and device_cc.lower() not in targets:
        how = ("lily-deploy build-trt --compute-capability current (or " + device_cc.lower() + ")"
               if backend == "tensorrt-rtx" else "lily-deploy build-trt on this GPU")
        raise LilyDeployError(f"{engine} was built for {', '.join(targets)}; {device_name} is {device_cc.lower()}: "
                              f"rebuild it with {how}")


def pick_profile(profiles: Sequence[Mapping[str, tuple]], shapes: Mapping[str, Sequence[int]],
                 engine: str = "the engine") -> int:
    """The first profile whose [min, max] holds every input shape; a clear error when none does.

    ``profiles[k][name] = (min, opt, max)``.
    """
    for k, prof in enumerate(profiles):
        ok = True
        for name, shape in shapes.items():
            if name not in prof:
                continue
            lo, _, hi = prof[name]
            if len(shape) != len(lo) or any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
                ok = False
                break
        if ok:
            return k
    given = ", ".join(f"{n} {_fmt(s)}" for n, s in shapes.items())
    allowed = "; ".join(f"profile {k}: " + ", ".join(f"{n} {_fmt(lo)}..{_fmt(hi)}" for n, (lo, _, hi) in p.items())
                        for k, p in enumerate(profiles))
    raise LilyDeployError(f"input shapes {given} fit no optimization profile of {engine} ({allowed}); "
                          "rebuild with --min-shapes/--max-shapes that cover them")


class TrtRunner:
    """Loads an engine once and runs it on numpy or torch inputs.

    >>> runner = TrtRunner("model.plan")            # doctest: +SKIP
    >>> runner({"input_ids": ids, "attention_mask": mask, "token_type_ids": tt})["logits"]  # doctest: +SKIP
    """

    def __init__(self, engine_path: str | os.PathLike, backend: Optional[str] = None, device: int = 0,
                 check: bool = True, adapter=None):
        from . import split_adapter_spec

        engine_path, spec_adapter = split_adapter_spec(engine_path)
        adapter = adapter if adapter is not None else spec_adapter
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise LilyDeployError(f"{self.path}: no such engine file")
        check_engine_header(self.path, str(self.path))
        self.report = read_report(self.path)
        name = backend or (self.report["backend"]["name"] if self.report else "auto")
        self.backend: Backend = load_backend(name)
        trt = self.backend.trt
        if not cuda_available():
            raise LilyDeployError(f"running {self.path} needs a CUDA GPU; none is visible here "
                                  "(torch.cuda.is_available() is False). Engines can be built here, not run")
        import torch

        self.device = torch.device("cuda", device)
        major, minor = torch.cuda.get_device_capability(self.device)
        self.device_cc = f"sm{major}{minor}"
        self.device_name = torch.cuda.get_device_name(self.device)
        if self.backend.rtx and not rtx_supports(self.backend, self.device_cc):
            raise LilyDeployError(
                f"{self.backend.pretty} does not run on {self.device_name} ({self.device_cc}); it supports "
                f"{', '.join(rtx_targets(self.backend))}: on this GPU build and run with standard TensorRT "
                f"({INSTALL['tensorrt']}, then lily-deploy build-trt --backend tensorrt)")
        if check and self.report is not None:
            check_compatible(self.report, self.backend.name, self.backend.version, self.device_cc,
                             self.device_name, str(self.path))
        if self.report is not None and str(self.report.get("route", "")).startswith("plugin"):
            from ..converters.trt_plugin import register_plugin

            register_plugin(self.backend)
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        data = self.path.read_bytes()
        if check and hasattr(self.runtime, "get_engine_validity"):
            validity, diagnostics = self.runtime.get_engine_validity(data[: self.runtime.engine_header_size])
            if validity == trt.EngineValidity.INVALID:
                why = [m.lower().replace("_", " ") for m, v in trt.EngineInvalidityDiagnostics.__members__.items()
                       if int(diagnostics) & int(v)]
                raise LilyDeployError(f"{self.path}: {self.backend.pretty} says the engine cannot run on "
                                      f"{self.device_name} ({self.device_cc}): {', '.join(why) or 'invalid'}")
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise LilyDeployError(f"{self.path}: {self.backend.pretty} could not load the engine: "
                                      + "; ".join(self.logger.errors[-3:]))
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        # a switchable engine's adapter tensors are inputs too, bound from an adapter (use_adapter), not fed
        self.adapter_names = [n for n in inputs if n.startswith(ADAPTER_PREFIX)]
        self.input_names = [n for n in inputs if n not in self.adapter_names]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.profiles = [
            {n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, k))
             for n in self.input_names}
            for k in range(self.engine.num_optimization_profiles)
        ]
        self.active_profile = 0
        self._dtypes = {n: getattr(torch, _TORCH_DTYPES[str(self.engine.get_tensor_dtype(n)).split(".")[-1]])
                        for n in names}
        self.adapter: Optional[dict] = None
        if adapter is not None:
            self.use_adapter(adapter)
        elif self.adapter_names:
            raise LilyDeployError(f"{self.path}: a switchable engine ({len(self.adapter_names)} adapter tensors as "
                                  f"inputs) runs with an adapter: give {self.path}+TASK.onnx_adapter")

    def load_adapter(self, adapter) -> dict:
        """An ``.onnx_adapter`` file's tensors on this runner's GPU, checked against the engine's adapter inputs."""
        import torch

        from .ort import OrtAdapter, check_adapter_fit

        if not isinstance(adapter, OrtAdapter):
            adapter = OrtAdapter(adapter)
        if not self.adapter_names:
            raise LilyDeployError(f"{self.path}: not a switchable engine, so it takes no adapter ({adapter.path})")
        info = {"tensors": {n: {"shape": list(self.profiles[0][n][0])} for n in self.adapter_names}}
        check_adapter_fit(adapter.shapes, info, None, f"adapter {adapter.path}", str(self.path))
        return {n: torch.as_tensor(a).to(self.device, self._dtypes[n]).contiguous()
                for n, a in adapter.arrays().items()}

    def use_adapter(self, adapter) -> None:
        """Bind ``adapter``'s tensors for every later run: one upload of a few hundred KB, no rebuild."""
        self.adapter = self.load_adapter(adapter)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        for attr in ("context", "engine"):
            if hasattr(self, attr):
                delattr(self, attr)

    backend = "tensorrt"

    @property
    def name(self) -> str:
        return self.path.name

    def __call__(self, feeds: Mapping[str, object], as_torch: bool = False) -> dict:
        return self.infer(feeds, as_torch=as_torch)

    def bind(self, feeds: Mapping[str, object], adapter=None) -> Callable[[], None]:
        """A zero-argument call that runs the engine on ``feeds`` (outputs stay on the GPU): for timing."""
        feeds = {n: feeds[n] for n in self.input_names}
        tensors = self.load_adapter(adapter) if adapter is not None else None
        return lambda: self.infer(feeds, as_torch=True, adapter=tensors)

    def infer(self, feeds: Mapping[str, object], as_torch: bool = False, adapter=None) -> dict:
        """Run once: ``{input name: array}`` -> ``{output name: numpy array}`` (torch with ``as_torch``).

        ``adapter`` (a path, or tensors from :meth:`load_adapter`) chooses a switchable engine's adapter
        for this call only; otherwise the one of :meth:`use_adapter`.
        """
        import torch

        tensors = self.adapter if adapter is None else adapter if isinstance(adapter, dict) \
            else self.load_adapter(adapter)

        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise LilyDeployError(f"{self.path}: inputs {self.input_names} expected"
                                  + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
        shapes = {n: tuple(np.shape(feeds[n])) for n in self.input_names}
        k = pick_profile(self.profiles, shapes, str(self.path))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if k != self.active_profile:
                self.context.set_optimization_profile_async(k, self.stream.cuda_stream)
                self.active_profile = k
            buffers = {}
            for n in self.input_names:
                t = torch.as_tensor(feeds[n]).to(self.device, self._dtypes[n], non_blocking=True).contiguous()
                buffers[n] = t
                if not self.context.set_input_shape(n, tuple(t.shape)):
                    raise LilyDeployError(f"{self.path}: {n} shape {_fmt(t.shape)} was refused: "
                                          + "; ".join(self.logger.errors[-2:]))
                self.context.set_tensor_address(n, t.data_ptr())
            for n in self.adapter_names:  # resident on the GPU: binding is setting an address
                self.context.set_input_shape(n, tuple(tensors[n].shape))
                self.context.set_tensor_address(n, tensors[n].data_ptr())
            outputs = {}
            for n in self.output_names:
                shape = tuple(self.context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise LilyDeployError(f"{self.path}: output {n} has an unresolved shape {shape}")
                out = torch.empty(shape, dtype=self._dtypes[n], device=self.device)
                outputs[n] = out
                self.context.set_tensor_address(n, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise LilyDeployError(f"{self.path}: execution failed: " + "; ".join(self.logger.errors[-3:]))
        self.stream.synchronize()
        if as_torch:
            return outputs
        return {n: t.cpu().numpy() for n, t in outputs.items()}


def load_runner(engine_path: str | os.PathLike, backend: Optional[str] = None, device: int = 0) -> TrtRunner:
    """:class:`TrtRunner` for ``engine_path`` (what ``parity`` and ``bench`` call)."""
    return TrtRunner(engine_path, backend=backend, device=device)
