"""Build TensorRT and TensorRT-for-RTX engines from ONNX, and say what was built.

One builder serves both backends: standard TensorRT (``tensorrt``, 10 or 11, needs a GPU to
build) and TensorRT for RTX (``tensorrt_rtx``, builds ahead of time for named compute
capabilities on a machine with no GPU, which is how CI builds real engines). Networks are
strongly typed: precision comes from the graph (casts for FP16, Q/DQ for INT8); TensorRT 10's
legacy precision flags are used only when asked for and only where the backend still has them.

:func:`build_engine` takes one :class:`BuildConfig` (or its fields as keywords); a value that
does not fit the model or the backend raises :class:`ConfigError` naming its field, and no
output may be an input (the ONNX, its weights) or another output.

Every engine gets a report beside it (``model.plan.json``): backend and version, target
compute capabilities, optimization profiles, I/O, build time and size, the graph's precision
summary, and (with a GPU) the engine inspector's layer list. The runner reads the report to
refuse an engine built for another GPU or TensorRT version with a clear message.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .core.config import ConfigError, StageConfig, check_choice, check_number
from .core.errors import LilyDeployError
from .core.fileio import atomic_file, check_not_input, check_output_parent, sha256_file, write_json
from .runtime.onnx_io import load_onnx
from .runtime.tensorrt import (BACKENDS, INSTALL, MODULES, PRETTY, Backend, cuda_available, load_backend,
                               make_logger, report_path, rtx_supports, rtx_targets)

# dynamic axes of the exported graphs and their default ranges (min, max); opt is the middle
DEFAULT_RANGES = {"batch": (1, 32), "sequence": (1, 512)}
DEFAULT_RTX_TARGET = "sm89"
MIN_WORKSPACE = 1 << 20  # below this nothing real builds: a slip (1KiB for 1GiB), not a limit
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
               17: "float8e4m3fn", 19: "float8e5m2", 21: "uint4", 22: "int4", 23: "float4e2m1"}
ITEMSIZE = {"float32": 4, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "bool": 1, "float16": 2,
            "float64": 8, "uint32": 4, "uint64": 8, "bfloat16": 2, "float8e4m3fn": 1, "float8e5m2": 1,
            "uint4": 0.5, "int4": 0.5, "float4e2m1": 0.5}


# ---------------------------------------------------------------------------------------
# field values: sizes, compute capabilities, shape specs
# ---------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10 ** 3, "m": 1 << 20, "mib": 1 << 20,
          "mb": 10 ** 6, "g": 1 << 30, "gib": 1 << 30, "gb": 10 ** 9, "t": 1 << 40, "tib": 1 << 40, "tb": 10 ** 12}
_CC_PATTERN = r"(?:sm_?)?(\d+)(?:\.(\d+))?"


def parse_size(text: str, field_name: str = "workspace") -> int:
    """``2GiB``, ``512MiB``, ``1.5G`` (K/M/G binary like trtexec, KB/MB/GB decimal), ``4096`` bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(field_name, f"{text!r}: expected a size such as 2GiB, 512MiB or 1048576")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConfigError(field_name, f"{text!r}: must be more than 0 bytes")
    return value


def format_size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _cc_member(text: str) -> Optional[str]:
    """``sm89`` / ``89`` / ``8.9`` / ``current`` -> ``SM89`` / ``CURRENT``; None when it is no such spelling."""
    raw = str(text).strip().lower()
    if raw == "current":
        return "CURRENT"
    m = re.fullmatch(_CC_PATTERN, raw)
    return f"SM{m.group(1)}{m.group(2) or ''}" if m else None


def parse_compute_capability(text: str, backend: Backend) -> str:
    """``sm89`` / ``89`` / ``8.9`` / ``current`` -> the backend's enum member name (``SM89``)."""
    name = _cc_member(text)
    members = [n for n in dir(backend.trt.ComputeCapability) if n.startswith("SM")]
    if name is None or (name != "CURRENT" and name not in members):
        known = ", ".join(n.lower() for n in sorted(members, key=lambda s: int(s[2:]))) + ", current"
        raise ConfigError("compute_capabilities", f"{text!r}: {backend.pretty} targets {known}")
    return name


def parse_shape_spec(text: str, field_name: str) -> dict[str, tuple[int, ...]]:
    """trtexec's ``name:1x128,other:1x128`` -> ``{name: (1, 128), ...}`` (names may hold ':')."""
    out: dict[str, tuple[int, ...]] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, dims = part.rpartition(":")
        name = name.strip().strip("'\"")
        if not sep or not name or not dims.strip():
            raise ConfigError(field_name, f"{part!r}: expected NAME:DIMS such as input_ids:1x128")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise ConfigError(field_name, f"{part!r}: dims must be integers joined by 'x', e.g. 1x128") from None
        if any(d < 1 for d in shape):
            raise ConfigError(field_name, f"{part!r}: every dim must be at least 1")
        if name in out:
            raise ConfigError(field_name, f"{text!r}: input {name!r} is given twice")
        out[name] = shape
    if not out:
        raise ConfigError(field_name, f"{text!r}: expected NAME:DIMS such as input_ids:1x128")
    return out


ShapeGroup = tuple[dict, dict, dict]  # one profile's parsed (min, opt, max) specs
_RANGE_FIELDS = ("min_shapes", "opt_shapes", "max_shapes")


def shape_groups(shapes: Sequence[str] = (), min_shapes: Sequence[str] = (), opt_shapes: Sequence[str] = (),
                 max_shapes: Sequence[str] = ()) -> tuple[list[ShapeGroup], tuple[str, str, str]]:
    """The profiles the shape fields ask for, parsed, and the field each of min/opt/max came from.

    Each ``shapes`` entry is one fixed profile; the k-th ``min/opt/max_shapes`` entries together
    are the k-th profile. Nothing given: one profile of defaults.
    """
    ranges = [list(x or ()) for x in (min_shapes, opt_shapes, max_shapes)]
    shapes = list(shapes or ())
    if shapes and any(ranges):
        raise ConfigError("shapes", "fixed shapes: do not mix them with min_shapes/opt_shapes/max_shapes")
    if shapes:
        return [(parse_shape_spec(s, "shapes"),) * 3 for s in shapes], ("shapes",) * 3
    if not any(ranges):
        return [({}, {}, {})], _RANGE_FIELDS
    n = max(len(r) for r in ranges)
    uneven = [f for f, r in zip(_RANGE_FIELDS, ranges) if len(r) not in (0, n)]
    if uneven:
        said = ", ".join(f"{f} {len(r)}x" for f, r in zip(_RANGE_FIELDS, ranges))
        raise ConfigError(uneven[0], f"{said}: give each of these once per profile (or not at all)")
    groups = [tuple(parse_shape_spec(r[k], f) if r else {} for r, f in zip(ranges, _RANGE_FIELDS)) for k in range(n)]
    return groups, _RANGE_FIELDS


# ---------------------------------------------------------------------------------------
# the ONNX side: I/O, dynamic axes, precision summary
# ---------------------------------------------------------------------------------------

@dataclass
class TensorSpec:
    name: str
    dims: list  # int for a fixed dim, str for a named dynamic dim, None for an unnamed one
    dtype: str

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": self.dims, "dtype": self.dtype}


def _tensor_spec(value_info) -> TensorSpec:
    t = value_info.type.tensor_type
    dims: list = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(value_info.name, dims, ONNX_DTYPES.get(t.elem_type, str(t.elem_type)))


def onnx_io(model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (initializers excluded, as older exporters list them too) and outputs."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [_tensor_spec(v) for v in model.graph.input if v.name not in inits]
    outputs = [_tensor_spec(v) for v in model.graph.output]
    return inputs, outputs


def axis_kind(name, axis: int) -> Optional[str]:
    """Which default range a dynamic axis gets: batch, sequence, or None (the user must say)."""
    low = (name or "").lower()
    if "batch" in low or low in ("n", "b", "bs") or (not low and axis == 0):
        return "batch"
    if any(k in low for k in ("seq", "len", "token", "time")) or (not low and axis == 1):
        return "sequence"
    return None


def precision_summary(model) -> dict:
    """What precision the graph asks for: Q/DQ counts, casts, initializer dtypes, custom ops."""
    import onnx

    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    count = lambda op: sum(1 for n in nodes if n.op_type == op and n.domain in ("", "ai.onnx"))  # noqa: E731
    casts: dict[str, int] = {}
    for n in nodes:
        if n.op_type == "Cast" and n.domain in ("", "ai.onnx"):
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            key = ONNX_DTYPES.get(to, str(to))
            casts[key] = casts.get(key, 0) + 1
    inits: dict[str, dict] = {}
    for t in model.graph.initializer:
        dtype = ONNX_DTYPES.get(t.data_type, str(t.data_type))
        numel = 1
        for d in t.dims:
            numel *= int(d)
        entry = inits.setdefault(dtype, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += int(numel * ITEMSIZE.get(dtype, 0))
    q, dq = count("QuantizeLinear"), count("DequantizeLinear")
    custom: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx", "ai.onnx.ml"):
            key = f"{n.domain}::{n.op_type}"
            custom[key] = custom.get(key, 0) + 1
    quantized = {n.input[0] for n in nodes if n.op_type == "DequantizeLinear"} | \
        {n.input[2] for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2}
    quant_types = sorted({ONNX_DTYPES.get(t.data_type, "?") for t in model.graph.initializer if t.name in quantized}
                         - {"float32", "float16"})
    if q or dq:
        label = "int8 (Q/DQ)" if not quant_types or "int8" in quant_types else f"{'/'.join(quant_types)} (Q/DQ)"
    elif casts.get("float16") or "float16" in inits:
        label = "fp16"
    elif casts.get("bfloat16") or "bfloat16" in inits:
        label = "bf16"
    else:
        label = "fp32"
    return {
        "label": label,
        "quantize_linear": q,
        "dequantize_linear": dq,
        "casts": dict(sorted(casts.items())),
        "fp16_casts": casts.get("float16", 0),
        "initializers": dict(sorted(inits.items())),
        "custom_ops": dict(sorted(custom.items())),
        "local_functions": sorted(f"{f.domain}::{f.name}" for f in model.functions),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": model.ir_version,
        "onnx_version": onnx.__version__,
    }


# ---------------------------------------------------------------------------------------
# optimization profiles
# ---------------------------------------------------------------------------------------

@dataclass
class Profile:
    """One optimization profile: ``{input: (min, opt, max)}``, each a shape tuple."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def as_dict(self) -> dict:
        return {name: {"min": list(a), "opt": list(b), "max": list(c)} for name, (a, b, c) in self.shapes.items()}

    def fits(self, shapes: dict[str, Sequence[int]]) -> bool:
        for name, shape in shapes.items():
            if name not in self.shapes:
                continue
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
                return False
        return True


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)


def resolve_profiles(inputs: list[TensorSpec], shapes: Sequence[str] = (), min_shapes: Sequence[str] = (),
                     opt_shapes: Sequence[str] = (), max_shapes: Sequence[str] = ()) -> list[Profile]:
    """Optimization profiles from trtexec-style specs, defaults from the ONNX's dynamic axes.

    Each ``shapes`` entry gives one fixed profile; the k-th ``min/opt/max_shapes`` together give
    the k-th profile. An input left out takes its named dims from the inputs given (``batch`` and
    ``sequence`` are shared by input_ids, attention_mask, ...) and the default range otherwise.
    A spec that does not fit the ONNX raises :class:`ConfigError` naming its field.
    """
    groups, fields = shape_groups(shapes, min_shapes, opt_shapes, max_shapes)
    by_name = {t.name: t for t in inputs}
    profiles = []
    for k, group in enumerate(groups):
        where = f"profile {k}" if len(groups) > 1 else "the profile"
        _check_specs(group, fields, by_name)
        named = _named_dims(group, fields, by_name, where)
        resolved = {}
        for t in inputs:
            axes = [_axis_range(t, axis, w, group, named, fields, where) for axis, w in enumerate(t.dims)]
            resolved[t.name] = tuple(tuple(r[j] for r in axes) for j in range(3))
        profiles.append(Profile(resolved))
    return profiles


DECODER_RANGES = {"batch": (1, 32), "context": 512}  # default decoder profiles: batch, longest sequence
DECODER_CACHE_PREFIXES = ("past_key_values.", "past_routing.")  # the inputs only a cached decoder has


def is_decoder_graph(inputs: list[TensorSpec]) -> bool:
    """A graph exported with a KV cache (``past_key_values.*`` inputs)."""
    return any(t.name.startswith("past_key_values.") for t in inputs)


def decoder_profiles(inputs: list[TensorSpec]) -> list[Profile]:
    """Two profiles for a cached decoder: prefill (a prompt, empty past) and decode (one token, a past).

    The exported axes are named ``batch``, ``sequence`` (new tokens), ``past_sequence`` and
    ``total_sequence`` (past + new, the attention mask's length).
    """
    lo, hi = DECODER_RANGES["batch"]
    ctx = DECODER_RANGES["context"]
    batch = (lo, (lo + hi) // 2, hi)
    phases = {
        "prefill": {"batch": batch, "sequence": (1, ctx // 4, ctx), "past_sequence": (0, 0, 0),
                    "total_sequence": (1, ctx // 4, ctx)},
        "decode": {"batch": batch, "sequence": (1, 1, 1), "past_sequence": (1, ctx // 2, ctx - 1),
                   "total_sequence": (2, ctx // 2 + 1, ctx)},
    }
    profiles = []
    for phase, dims in phases.items():
        shapes = {}
        for t in inputs:
            axes = []
            for axis, w in enumerate(t.dims):
                if isinstance(w, int):
                    axes.append((w, w, w))
                elif w in dims:
                    axes.append(dims[w])
                else:
                    raise ConfigError("shapes", f"input {t.name} axis {axis} ({w or 'unnamed'}) has no default "
                                                f"{phase} range: give the profiles with min_shapes/opt_shapes/max_shapes")
            shapes[t.name] = tuple(tuple(a[j] for a in axes) for j in range(3))
        profiles.append(Profile(shapes))
    return profiles


def _check_specs(group: ShapeGroup, fields: Sequence[str], by_name: dict[str, TensorSpec]) -> None:
    """Every given shape names an input of the ONNX, with its rank and its fixed dims."""
    for spec, field_name in zip(group, fields):
        for name, shape in spec.items():
            if name not in by_name and name.startswith(DECODER_CACHE_PREFIXES) and \
                    not is_decoder_graph(list(by_name.values())):
                raise ConfigError(field_name, f"{name}:{_fmt(shape)}: decoder (prefill/decode) profiles need a "
                                              "graph with a KV cache, and this one has no past_key_values.* inputs "
                                              "(exported with --no-cache?); give shapes for its inputs "
                                              f"({', '.join(by_name)}) or export the decoder with its cache")
            if name not in by_name:
                raise ConfigError(field_name, f"{name}:{_fmt(shape)}: the ONNX has no input {name!r} "
                                              f"(inputs: {', '.join(by_name)})")
            want = by_name[name].dims
            if len(shape) != len(want):
                raise ConfigError(field_name, f"{name}:{_fmt(shape)}: input {name} has {len(want)} dims "
                                              f"({_fmt(d if d is not None else '?' for d in want)}), not {len(shape)}")
            for axis, (d, w) in enumerate(zip(shape, want)):
                if isinstance(w, int) and d != w:
                    raise ConfigError(field_name, f"{name}:{_fmt(shape)}: axis {axis} of {name} is fixed at "
                                                  f"{w} in the ONNX, not {d}")


def _named_dims(group: ShapeGroup, fields: Sequence[str], by_name: dict[str, TensorSpec],
                where: str) -> list[dict[str, tuple[int, str]]]:
    """Sizes of named dims (``batch``, ``sequence``) seen in the given specs, for min, opt, max.

    Inputs sharing a dim name must agree: the value then fills the inputs left out.
    """
    named: list[dict[str, tuple[int, str]]] = [{}, {}, {}]
    for j, spec in enumerate(group):
        for name, shape in spec.items():
            for axis, w in enumerate(by_name[name].dims):
                if isinstance(w, str):
                    prev = named[j].setdefault(w, (shape[axis], name))
                    if prev[0] != shape[axis]:
                        raise ConfigError(fields[j], f"{prev[1]} and {name} give dim {w!r} different sizes "
                                                     f"({prev[0]} and {shape[axis]}) in {where}")
    return named


def _axis_range(t: TensorSpec, axis: int, w, group: ShapeGroup, named: list[dict], fields: Sequence[str],
                where: str) -> tuple[int, int, int]:
    """(min, opt, max) of one axis: fixed dims as they are, dynamic ones from the specs or defaults."""
    if isinstance(w, int):
        return w, w, w
    given = []
    for j in range(3):
        if t.name in group[j]:
            given.append(group[j][t.name][axis])
        elif isinstance(w, str) and w in named[j]:
            given.append(named[j][w][0])
        else:
            given.append(None)
    kind = axis_kind(w, axis)
    if kind is None and (given[0] is None or given[2] is None) and given[1] is None:
        blame = "shapes" if given == [None] * 3 else fields[0 if given[0] is None else 2]
        raise ConfigError(blame,
                          f"input {t.name} axis {axis} ({w or 'unnamed'}) is dynamic with no default range: "
                          "give its sizes in shapes, or in min_shapes and max_shapes")
    dlo, dhi = DEFAULT_RANGES.get(kind, (None, None))
    a, b, c = given
    if kind is None:  # no default range: what was given bounds the axis
        dlo = min(v for v in given if v is not None)
        dhi = max(v for v in given if v is not None)
    if a is None:
        a = min([dlo, *(v for v in (b, c) if v is not None)])
    if c is None:
        c = max([dhi, *(v for v in (a, b) if v is not None)])
    if b is None:
        b = (a + c) // 2
    if not a <= b <= c:
        blame = next(fields[j] for j in (1, 0, 2) if given[j] is not None)
        raise ConfigError(blame, f"{where}: input {t.name} axis {axis} ({w or 'unnamed'}) has min {a}, opt {b}, "
                                 f"max {c}: need min <= opt <= max")
    return a, b, c


# ---------------------------------------------------------------------------------------
# logging, parse errors, progress, Ctrl-C
# ---------------------------------------------------------------------------------------

class BuildError(LilyDeployError):
    """A user error whose message is several lines: one per parse or build error."""

    def __init__(self, headline: str, lines: Sequence[str]):
        Exception.__init__(self, "\n".join([" ".join(str(headline).split())]
                                           + ["  " + " ".join(str(x).split()) for x in lines]))
        self.lines = list(lines)


def _node_index(model) -> dict[str, str]:
    """node name -> ``domain::op`` over the main graph and every local function."""
    out = {}
    for n in list(model.graph.node) + [n for f in model.functions for n in f.node]:
        if n.name:
            out.setdefault(n.name, f"{n.domain + '::' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}")
    return out


def parse_error_lines(parser, model, onnx_path) -> list[str]:
    """One line per parser error: node name, op type, local-function stack, reason."""
    index = _node_index(model)
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        name = e.node_name() if hasattr(e, "node_name") else ""
        op = e.node_operator() if hasattr(e, "node_operator") else ""
        stack = list(e.local_function_stack()) if hasattr(e, "local_function_stack") else []
        code = str(e.code()).split(".")[-1]
        desc = e.desc()
        if "Plugin not found" in desc:
            reason = ("no TensorRT importer, model-local function or registered plugin for this op "
                      "(a custom op needs its FunctionProto body in the file, or --plugin-route)")
        elif code == "UNSUPPORTED_NODE":
            reason = f"TensorRT does not support this node ({desc}; {e.func()} in {e.file()})"
        else:
            reason = f"{code.lower()}: {desc}"
        if e.node() < 0 and not name:
            lines.append(f"{onnx_path}: {reason}")
            continue
        where = f"node {name!r} ({index.get(name, op)})"
        if stack:
            where += " in local function " + " > ".join(stack)
        lines.append(f"{where}: {reason}")
    return lines


class _Interrupt:
    """Turns Ctrl-C during a build into a clean cancel: the monitor returns False, we raise after."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _make_monitor(trt, interrupt: _Interrupt, progress: bool):
    from tqdm.auto import tqdm

    class Monitor(trt.IProgressMonitor):
        """A tqdm bar over the top-level build phases; cancels the build on Ctrl-C."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bar = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None and progress and self.bar is None:
                self.bar = tqdm(total=num_steps, desc="build-trt", unit="step", file=sys.stderr, leave=False)
            elif parent_phase is not None and self.bar is not None:
                self.bar.set_postfix_str(phase_name[:40])

        def step_complete(self, phase_name, step):
            if self.bar is not None and phase_name == "Building engine":
                self.bar.update(1)
            return not interrupt.requested

        def phase_finish(self, phase_name):
            if phase_name == "Building engine" and self.bar is not None:
                self.bar.close()
                self.bar = None

    return Monitor()


def _build_serialized(builder, network, config):
    """The one call that builds (kept apart so tests can interrupt it)."""
    return builder.build_serialized_network(network, config)


# ---------------------------------------------------------------------------------------
# the build
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildConfig(StageConfig):
    """What :func:`build_engine` builds: the ONNX, where the engine goes, profiles, limits, targets.

    ``output`` None puts the engine beside the ONNX (``MODEL.plan``); ``workspace`` None leaves the
    backend's default (a size such as ``"2GiB"`` is turned into bytes); ``timing_cache`` None uses
    none; no ``compute_capabilities`` builds for the GPU here where TensorRT-RTX can, else sm89.
    """

    onnx_path: str | os.PathLike
    output: Optional[str | os.PathLike] = None
    backend: str = "auto"
    shapes: Sequence[str] = ()
    min_shapes: Sequence[str] = ()
    opt_shapes: Sequence[str] = ()
    max_shapes: Sequence[str] = ()
    workspace: Optional[str | int] = None
    timing_cache: Optional[str | os.PathLike] = None
    compute_capabilities: Sequence[str] = ()
    plugin_route: bool = False
    fp16: bool = False
    int8: bool = False
    verbose: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        # lists become tuples (the config is frozen) and a size its bytes, before validation
        for name in ("shapes", "min_shapes", "opt_shapes", "max_shapes", "compute_capabilities"):
            object.__setattr__(self, name, _as_tuple(name, getattr(self, name)))
        if isinstance(self.workspace, str):
            object.__setattr__(self, "workspace", parse_size(self.workspace))
        super().__post_init__()

    def validate(self) -> None:
        if self.onnx_path is None or not str(self.onnx_path):
            raise ConfigError("onnx_path", "the ONNX file to build is required")
        check_choice("backend", self.backend, BACKENDS)
        shape_groups(self.shapes, self.min_shapes, self.opt_shapes, self.max_shapes)
        if self.workspace is not None:
            check_number("workspace", self.workspace, minimum=1, integer=True)
            if self.workspace < MIN_WORKSPACE:
                raise ConfigError("workspace", f"{format_size(self.workspace)} is too small to build with: "
                                               "give at least 1 MiB (e.g. 512MiB, 2GiB)")
        bad = [c for c in self.compute_capabilities if _cc_member(c) is None]
        if bad:
            raise ConfigError("compute_capabilities", f"{bad[0]!r}: expected a target such as sm89, 8.9 or current")

    @property
    def engine_path(self) -> Path:
        """Where the engine goes: ``output``, or ``MODEL.plan`` beside the ONNX."""
        return Path(self.output) if self.output is not None else Path(self.onnx_path).with_suffix(".plan")


def _as_tuple(name: str, value) -> tuple[str, ...]:
    """A list field as a tuple; one string is one entry (not its characters)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(str(v) for v in value)
    except TypeError:
        raise ConfigError(name, f"expected a list of strings, got {value!r}") from None


@dataclass
class BuildReport:
    """What was built, as written to ``<engine>.json``."""

    data: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.data["engine"]["path"])

    def __getitem__(self, key):
        return self.data[key]

    def table(self) -> str:
        return format_report(self.data)


def _trt_dtype(dt) -> str:
    name = str(dt).split(".")[-1].lower()
    return {"float": "float32", "half": "float16", "bf16": "bfloat16", "int8": "int8", "int32": "int32",
            "int64": "int64", "bool": "bool", "uint8": "uint8", "fp8": "float8", "int4": "int4"}.get(name, name)


def _gpu_info() -> Optional[dict]:
    if not cuda_available():
        return None
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"sm{major}{minor}"}


def _inspect_layers(backend: Backend, engine_bytes, logger) -> tuple[Optional[dict], str]:
    """Layer information from the engine inspector (needs a GPU to deserialize)."""
    trt = backend.trt
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        return None, "engine inspector: the engine did not deserialize here: " + "; ".join(logger.errors[-2:])
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", [])
    types: dict[str, int] = {}
    rows = []
    for layer in layers:
        if isinstance(layer, str):
            rows.append({"name": layer})
            continue
        ltype = layer.get("LayerType", "?")
        types[ltype] = types.get(ltype, 0) + 1
        outs = layer.get("Outputs", [])
        rows.append({"name": layer.get("Name"), "type": ltype,
                     "outputs": [o.get("Format/Datatype") for o in outs if isinstance(o, dict)]})
    return {"count": len(layers), "by_type": dict(sorted(types.items())), "layers": rows}, ""


def build_engine(config: Optional[BuildConfig] = None, /, **fields) -> BuildReport:
    """Build the engine ``config`` describes (or a :class:`BuildConfig` of ``fields``) and report.

    Bad input raises :class:`LilyDeployError` before any long work where it can be seen early
    (missing file, an output that is an input; a field value that does not fit the model or the
    backend as :class:`ConfigError` naming the field); parse and build failures list every error
    TensorRT gave, one per line. The engine and report are written atomically: a failure or
    Ctrl-C leaves neither a partial engine nor a temporary file.
    """
    config = BuildConfig.resolve(config, **fields)
    plan = _plan(config)
    logger = make_logger(plan.backend.trt, config.verbose)
    builder, network, _parser = _parse_network(plan, logger)  # the parser owns the weights: held to the end
    builder_config = _configure(plan, builder, logger)
    cache, cache_info = None, None
    if config.timing_cache is not None:
        cache, cache_info = _open_timing_cache(plan, builder_config, logger)
    serialized, seconds = _build(plan, builder, network, builder_config, logger)
    if cache is not None:
        cache_info["saved_bytes"] = _save_timing_cache(Path(config.timing_cache), cache)
    layers, layers_note = _layers(plan, serialized, logger)
    report = _report_data(plan, network, seconds, cache_info, layers, layers_note)
    _write_report(config.engine_path, report)
    return BuildReport(report)


# ---------------------------------------------------------------------------------------
# before TensorRT: outputs, targets, precision flags, route
# ---------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """Everything settled before TensorRT is called: the graph, its profiles, backend, targets, route."""

    config: BuildConfig
    model: Any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    profiles: list[Profile]
    backend: Backend
    gpu: Optional[dict]
    targets: list[str]
    notes: list[str]
    legacy: list[str]
    strongly_typed: bool
    route: str
    parse_bytes: Optional[bytes]


def _plan(config: BuildConfig) -> _Plan:
    """Load the ONNX and check every choice against it and the backend, before the long work."""
    from .graph_optimize import refuse_for_tensorrt
    from .switchable import engine_graph

    model = load_onnx(config.onnx_path)
    refuse_for_tensorrt(model, config.onnx_path)  # onnxruntime's fused ops are not TensorRT's
    _check_outputs(config, model)
    model, n_adapter = engine_graph(model)  # a switchable graph: its adapter tensors become engine inputs
    inputs, outputs = onnx_io(model)
    given = config.shapes or config.min_shapes or config.opt_shapes or config.max_shapes
    if not given and is_decoder_graph(inputs):
        profiles = decoder_profiles(inputs)
    else:
        profiles = resolve_profiles(inputs, config.shapes, config.min_shapes, config.opt_shapes, config.max_shapes)
    be = load_backend(config.backend)
    gpu = _gpu_info()
    targets, notes = _resolve_targets(config, be, gpu)
    legacy = _legacy_flags(config, be)
    strongly_typed = not legacy and hasattr(be.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    route, parse_bytes = _plugin_route(config, model, be)
    if n_adapter:  # fixed-shape inputs (profile min = opt = max); the runner binds an adapter's tensors
        parse_bytes = parse_bytes if parse_bytes is not None else model.SerializeToString()
        notes.append(f"{n_adapter} adapter tensors are engine inputs: run it as ENGINE+TASK.onnx_adapter")
    return _Plan(config, model, inputs, outputs, profiles, be, gpu, targets, notes, legacy, strongly_typed,
                 route, parse_bytes)


def _weights_files(model, onnx_path: Path) -> list[Path]:
    """The files the ONNX keeps its weights in (``model.onnx.data`` or whatever ``location`` says)."""
    from onnx import TensorProto

    where = {e.value for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return [onnx_path.parent / loc for loc in sorted(where)]


def _check_outputs(config: BuildConfig, model) -> None:
    """Refuse outputs that cannot be written or that would replace an input, before any work.

    The engine, its report and the timing cache (written back after the build) must each differ
    from the ONNX model, its weights files and one another.
    """
    onnx_path, engine = Path(config.onnx_path), config.engine_path
    check_output_parent(engine, "-o")
    if engine.is_dir():
        raise LilyDeployError(f"-o {engine}: is a folder; give the engine file's path")
    outputs = [("-o", engine, "the engine"), ("-o", report_path(engine), "the engine's report")]
    if config.timing_cache is not None:
        cache = check_output_parent(config.timing_cache, "--timing-cache")
        outputs.append(("--timing-cache", cache, "the timing cache"))
    sources = [("ONNX model", onnx_path)] + [("ONNX model's weights", p) for p in _weights_files(model, onnx_path)]
    for k, (flag, path, what) in enumerate(outputs):
        if path.is_dir():
            raise LilyDeployError(f"{flag} {path}: {what} would go where a folder is; give a file's path")
        for name, source in sources:
            check_not_input(path, {name: source}, flag)
        for other_flag, other, other_what in outputs[:k]:
            if path.resolve() == other.resolve():
                raise LilyDeployError(f"{flag} {path}: is {other_what} too ({other_flag} {other}); "
                                      f"give {what} a file of its own")


def _resolve_targets(config: BuildConfig, be: Backend, gpu: Optional[dict]) -> tuple[list[str], list[str]]:
    """The compute capabilities to build for, and notes on how a default was chosen.

    TensorRT-RTX builds ahead of time for named targets (default: this GPU where it is one, else
    sm89); standard TensorRT builds for the GPU it runs on and takes none.
    """
    if not be.rtx:
        if config.compute_capabilities:
            raise ConfigError("compute_capabilities", f"for TensorRT-RTX ahead-of-time builds; {be.pretty} builds "
                                                      "for the GPU it runs on (choose backend tensorrt-rtx)")
        return [], []
    notes = []
    targets = [parse_compute_capability(c, be) for c in config.compute_capabilities]
    here_ok = gpu is not None and rtx_supports(be, gpu["compute_capability"])
    if not targets:
        targets = ["CURRENT"] if here_ok else [parse_compute_capability(DEFAULT_RTX_TARGET, be)]
        other = "name other targets in compute_capabilities"
        if gpu is None:
            notes.append(f"no GPU here: built ahead of time for {DEFAULT_RTX_TARGET} ({other})")
        elif not here_ok:
            notes.append(f"this GPU ({gpu['name']}, {gpu['compute_capability']}) is not a {be.pretty} target: "
                         f"built ahead of time for {DEFAULT_RTX_TARGET} ({other})")
    if "CURRENT" in targets and gpu is None:
        raise ConfigError("compute_capabilities", "current: no GPU is visible here; name a target such as sm89")
    if "CURRENT" in targets and not here_ok:
        raise ConfigError(
            "compute_capabilities",
            f"current: this GPU ({gpu['name']}, {gpu['compute_capability']}) is not a {be.pretty} target "
            f"({', '.join(rtx_targets(be))}): its engines cannot run here; use standard TensorRT on this GPU "
            f"({INSTALL['tensorrt']}) or name another GPU's target")
    return list(dict.fromkeys(targets)), notes


def _legacy_flags(config: BuildConfig, be: Backend) -> list[str]:
    """TensorRT 10's FP16/INT8 builder flags asked for; backends without them refuse."""
    legacy = [f for f, on in (("FP16", config.fp16), ("INT8", config.int8)) if on]
    if legacy and not be.has_precision_flags:
        raise ConfigError(legacy[0].lower(), f"{be.pretty} has no precision flags: networks are strongly typed "
                                             "and precision comes from the ONNX (make FP16/INT8 graphs with "
                                             "lily-deploy quantize)")
    return legacy


def _plugin_route(config: BuildConfig, model, be: Backend) -> tuple[str, Optional[bytes]]:
    """How lily::HPMix nodes are served: inlined function bodies, or the plugin (the marked graph's bytes)."""
    if not config.plugin_route:
        return "function-inlining", None
    from .converters.trt_plugin import mark_plugin_nodes, register_plugin

    marked = mark_plugin_nodes(model)
    if not marked:
        raise ConfigError("plugin_route", f"{config.onnx_path} has no lily::HPMix nodes to route to the plugin")
    register_plugin(be)
    return f"plugin ({len(marked)} lily::HPMix nodes)", model.SerializeToString()


# ---------------------------------------------------------------------------------------
# TensorRT: parse, configure, timing cache, build
# ---------------------------------------------------------------------------------------

def _parse_network(plan: _Plan, logger):
    """``(builder, network, parser)`` for the ONNX; every parser error becomes one line of a :class:`BuildError`."""
    trt, be = plan.backend.trt, plan.backend
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as exc:
        raise LilyDeployError(
            f"{be.pretty} could not create a builder ({exc}): standard TensorRT needs a CUDA GPU and driver to "
            "build; TensorRT-RTX builds without one (backend tensorrt-rtx)") from None
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = Path(plan.config.onnx_path)
    if plan.parse_bytes is not None:
        ok = parser.parse(plan.parse_bytes, str(onnx_path))
    else:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        lines = parse_error_lines(parser, plan.model, onnx_path) or logger.errors or ["(no detail from the parser)"]
        raise BuildError(f"{onnx_path}: {be.pretty}'s ONNX parser failed on {len(lines)} "
                         f"node{'s' if len(lines) != 1 else ''}:", lines)
    parsed = {network.get_input(i).name for i in range(network.num_inputs)}
    missing = [t.name for t in plan.inputs if t.name not in parsed]
    if missing:
        raise LilyDeployError(f"{onnx_path}: the parsed network lacks inputs {missing}")
    return builder, network, parser


def _configure(plan: _Plan, builder, logger):
    """The builder config: profiles, workspace limit, compute capabilities, legacy flags."""
    trt, be = plan.backend.trt, plan.backend
    builder_config = builder.create_builder_config()
    for k, prof in enumerate(plan.profiles):
        p = builder.create_optimization_profile()
        for name, (lo, mid, hi) in prof.shapes.items():
            p.set_shape(name, lo, mid, hi)
        if builder_config.add_optimization_profile(p) < 0:
            raise LilyDeployError(f"profile {k} was rejected by {be.pretty}: " + "; ".join(logger.errors[-2:]))
    if plan.config.workspace is not None:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.config.workspace))
    if be.rtx:
        builder_config.num_compute_capabilities = len(plan.targets)
        for i, name in enumerate(plan.targets):
            builder_config.set_compute_capability(getattr(trt.ComputeCapability, name), i)
    for flag in plan.legacy:
        builder_config.set_flag(getattr(trt.BuilderFlag, flag))
    if hasattr(trt, "ProfilingVerbosity"):
        builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    return builder_config


def _open_timing_cache(plan: _Plan, builder_config, logger) -> tuple[Any, dict]:
    """Load the timing cache file into the builder (a new cache when the file is absent or empty).

    The file is written back after the build, so one that does not start like this backend's
    caches (a mistyped path: an engine, a model) is refused rather than replaced. A cache the
    backend cannot use (another version's; TensorRT-RTX uses none) is started afresh, with a note.
    """
    path, be = Path(plan.config.timing_cache), plan.backend
    blob = path.read_bytes() if path.is_file() else b""
    n_errors, n_warnings = len(logger.errors), len(logger.warnings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        magic = bytes(memoryview(builder_config.create_timing_cache(b"").serialize()))[:4]
        if blob and magic and not blob.startswith(magic):
            raise LilyDeployError(f"--timing-cache {path}: not a timing cache ({len(blob)} bytes that do not start "
                                  f"like {be.pretty}'s); delete it or name another file to start a new cache")
        cache = builder_config.create_timing_cache(blob)
        if cache is None or not builder_config.set_timing_cache(cache, False):
            raise LilyDeployError(f"--timing-cache {path}: not a timing cache {be.pretty} can read "
                                  "(delete it to start a new one)")
    said = [m.lower() for m in logger.warnings[n_warnings:] + logger.errors[n_errors:]]
    del logger.errors[n_errors:]  # what the backend said while reading the cache is not a build error
    info = {"path": str(path), "loaded_bytes": len(blob), "saved_bytes": None}
    if any("no-op" in str(w.message) for w in caught):
        info["note"] = f"{be.pretty} ignores timing caches (kept for scripts shared with TensorRT)"
    elif blob and any("deserialize" in m or "will not be used" in m for m in said):
        info["note"] = f"{be.pretty} could not read this cache (another version's?): started a fresh one"
        plan.notes.append(f"timing cache {path}: {info['note']}")
    return cache, info


def _save_timing_cache(path: Path, cache) -> int:
    """Write the cache back (atomically); returns its size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blob = bytes(memoryview(cache.serialize()))
    with atomic_file(path, "--timing-cache") as tmp:
        tmp.write_bytes(blob)
    return len(blob)


def _build(plan: _Plan, builder, network, builder_config, logger):
    """Build into the engine file (atomically) and time it; Ctrl-C cancels through the progress monitor."""
    interrupt = _Interrupt()
    monitor = None  # held here: the builder config does not keep the Python object alive
    if hasattr(builder_config, "progress_monitor"):
        monitor = _make_monitor(plan.backend.trt, interrupt, plan.config.progress)
        builder_config.progress_monitor = monitor
    started = time.perf_counter()
    with atomic_file(plan.config.engine_path, "-o") as tmp, interrupt:
        serialized = _build_serialized(builder, network, builder_config)
        if interrupt.requested:
            raise KeyboardInterrupt
        if serialized is None:
            _raise_build_failure(plan, logger.errors)
        seconds = time.perf_counter() - started
        with open(tmp, "wb") as f:
            f.write(memoryview(serialized))
    return serialized, seconds


def _raise_build_failure(plan: _Plan, errors: list[str]):
    """A workspace too small is the workspace field's fault; anything else lists TensorRT's errors."""
    shortfall = _workspace_shortfall(errors, plan.config.workspace)
    if shortfall:
        raise ConfigError("workspace", shortfall)
    targets = plan.targets
    raise BuildError(f"{plan.config.onnx_path}: {plan.backend.pretty} failed to build the engine"
                     + (f" for {', '.join(t.lower() for t in targets)}" if targets else "") + ":",
                     _build_error_lines(errors))


def _workspace_shortfall(errors: list[str], workspace_bytes: Optional[int]) -> Optional[str]:
    """Why the build failed when the workspace limit was the cause, else None."""
    if workspace_bytes is None:
        return None
    for msg in errors:
        m = re.search(r"OutOfMemory \(Requested size was (\d+) bytes", msg)
        if m:
            need = int(m.group(1))
            return (f"{format_size(workspace_bytes)} is too small: the builder asked for {format_size(need)} "
                    f"({need} bytes); raise it")
        if "workspace" in msg.lower():
            return f"{format_size(workspace_bytes)} is too small ({msg.strip()}); raise it"
    return None


def _build_error_lines(errors: list[str]) -> list[str]:
    lines = []
    for msg in errors or ["(no detail from the builder)"]:
        lines.append(msg.strip())
        if "FP32 GEMM is not supported" in msg:
            lines.append("hint: TensorRT-RTX has no FP32 matrix multiply on Turing (sm75): target sm80 or newer, "
                         "or build an FP16 graph (lily-deploy quantize) for sm75")
    return list(dict.fromkeys(lines))


# ---------------------------------------------------------------------------------------
# after the build: layers, the report
# ---------------------------------------------------------------------------------------

def _layers(plan: _Plan, serialized, logger) -> tuple[Optional[dict], str]:
    """The engine inspector's layers where this machine can load the engine; else why not."""
    if plan.gpu is None:
        return None, "no CUDA GPU on the build machine: the engine inspector needs one"
    cc = plan.gpu["compute_capability"].upper()
    if plan.backend.rtx and "CURRENT" not in plan.targets and cc not in plan.targets:
        return None, f"engine targets {', '.join(t.lower() for t in plan.targets)}, this GPU is {cc.lower()}"
    return _inspect_layers(plan.backend, serialized, logger)


def _report_data(plan: _Plan, network, seconds: float, cache_info: Optional[dict], layers: Optional[dict],
                 layers_note: str) -> dict:
    """The build report: what was built, from what, for which targets, with what I/O and precision."""
    be, gpu, model, engine = plan.backend, plan.gpu, plan.model, plan.config.engine_path
    onnx_path = Path(plan.config.onnx_path)
    net_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    net_outputs = [network.get_output(i) for i in range(network.num_outputs)]
    meta = {p.key: p.value for p in model.metadata_props if p.key.startswith("lily_deploy.")}
    if be.rtx:
        targets = [gpu["compute_capability"] if t == "CURRENT" and gpu else t.lower() for t in plan.targets]
    else:
        targets = [gpu["compute_capability"]] if gpu else []
    return {
        "engine": {"path": str(engine), "bytes": engine.stat().st_size, "sha256": sha256_file(engine)},
        "onnx": {"path": str(onnx_path), "sha256": sha256_file(onnx_path),
                 "routing": meta.get("lily_deploy.routing"), "ops": meta.get("lily_deploy.ops"),
                 "task": meta.get("lily_deploy.task"), "base_model": meta.get("lily_deploy.base_model")},
        "backend": {"name": be.name, "module": MODULES[be.name], "version": be.version,
                    "onnx_parser": _parser_version(be.trt)},
        "target": {"compute_capabilities": targets, "build_gpu": gpu, "ahead_of_time": bool(be.rtx and gpu is None)},
        "route": plan.route,
        "strongly_typed": plan.strongly_typed,
        "legacy_precision_flags": plan.legacy,
        "workspace_bytes": plan.config.workspace,
        "build_seconds": round(seconds, 3),
        "profiles": [p.as_dict() for p in plan.profiles],
        "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": _trt_dtype(t.dtype),
                    "onnx_shape": next(s.dims for s in plan.inputs if s.name == t.name)} for t in net_inputs],
        "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": _trt_dtype(t.dtype),
                     "onnx_shape": next((s.dims for s in plan.outputs if s.name == t.name), None)}
                    for t in net_outputs],
        "precision": precision_summary(model),
        "timing_cache": cache_info,
        "layers": layers,
        "layers_note": layers_note or None,
        "notes": plan.notes,
        "lily_deploy_version": __import__("lily_deploy").__version__,
    }


def _write_report(engine: Path, report: dict) -> None:
    """The report beside the engine; if it cannot be written the engine goes too (the runner checks by it)."""
    try:
        write_json(report_path(engine), report, "-o")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            engine.unlink()
        raise


def _parser_version(trt) -> Optional[str]:
    fn = getattr(trt, "get_nv_onnx_parser_version", None)
    if fn is None:
        return None
    v = int(fn())
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v > 10000 else str(v)


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------


def format_report(r: dict) -> str:
    """The build report as a short table for the terminal."""
    be = r["backend"]
    tgt = r["target"]
    prec = r["precision"]
    rows = [
        ("engine", f"{r['engine']['path']} ({format_size(r['engine']['bytes'])})"),
        ("backend", f"{PRETTY.get(be['name'], be['name'])} {be['version']}"),
        ("target", (", ".join(tgt["compute_capabilities"]) or "-")
         + (" (ahead of time, no GPU)" if tgt.get("ahead_of_time") else "")
         + (f" (built on {tgt['build_gpu']['name']})" if tgt.get("build_gpu") else "")),
        ("route", r["route"]),
        ("precision", f"{prec['label']}: {prec['quantize_linear']} Q / {prec['dequantize_linear']} DQ, "
                      f"{prec['fp16_casts']} fp16 casts; initializers "
                      + ", ".join(f"{k} {v['count']}" for k, v in prec["initializers"].items())),
        ("typing", "strongly typed" if r["strongly_typed"] else "weakly typed, flags " + ",".join(
            r["legacy_precision_flags"])),
        ("workspace", format_size(r["workspace_bytes"]) if r["workspace_bytes"] else "backend default"),
        ("build time", f"{r['build_seconds']:.1f} s"),
    ]
    if r.get("timing_cache"):
        tc = r["timing_cache"]
        rows.append(("timing cache", f"{tc['path']} (read {tc['loaded_bytes']} B, wrote {tc['saved_bytes']} B)"
                     + (f"; {tc['note']}" if tc.get("note") else "")))
    if r.get("layers"):
        rows.append(("layers", f"{r['layers']['count']} (" + ", ".join(
            f"{k} {v}" for k, v in r["layers"]["by_type"].items()) + ")"))
    elif r.get("layers_note"):
        rows.append(("layers", r["layers_note"]))
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    out.append("")
    io_rows = [("io", "name", "dtype", "shape (onnx)")]
    for kind in ("inputs", "outputs"):
        for t in r[kind]:
            io_rows.append((kind[:-1], t["name"], t["dtype"],
                            "x".join(str(d) for d in t["shape"]) + "  (" + "x".join(
                                str(d) if d is not None else "?" for d in (t["onnx_shape"] or [])) + ")"))
    widths = [max(len(row[i]) for row in io_rows) for i in range(3)]
    out += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in io_rows]
    out.append("")
    for k, prof in enumerate(r["profiles"]):
        out.append(f"profile {k}:")
        for name, s in prof.items():
            out.append(f"  {name:<{widths[1]}}  min {_fmt(s['min'])}  opt {_fmt(s['opt'])}  max {_fmt(s['max'])}")
    for note in r.get("notes") or []:
        out.append(f"note: {note}")
    return "\n".join(out)
