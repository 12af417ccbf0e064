"""INT8 Q/DQ and FP16 settings, and what happens to ``lily::HPMix`` under them.

TensorRT 11 takes precision from the graph, so the settings here are the ones TensorRT (for
RTX) parses and builds (``../shared/docs/facts.md``): QDQ format, symmetric int8 activations
and weights (zero points 0), per-channel weights, biases left in float.

``quantize_static`` skips function nodes, so the ``lily::HPMix`` bodies are inlined first. The
adapter's pieces are found by position, before inlining: the MatMuls feeding an HPMix node's
first two inputs are the LP (``h = x A^T``) and router (``h R^T``); inside the body, MatMuls
that consume ``h`` are the HP MatMuls (``h @ B~``); everything else in the body (softmax,
mixing-vector reductions, ``p @ pool``) computes the mixing vector and stays fp32.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..core.config import ConfigError
from ..core.errors import LilyDeployError

CALIB_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OP_TYPES = ("MatMul", "Gemm")
# the options TensorRT accepts: with QuantizeBias (int32 biases) its parser rejects the graph. Q/DQ go
# on MatMul/Gemm inputs only (TensorRT's recommended placement): a Q/DQ on the output would round the
# result again before the bias, and onnxruntime would then only fuse the node to QLinearMatMul, which
# it does not do for int8 activations on x86 -- left float, the node runs as MatMulIntegerToFloat.
# DedicatedQDQPair: each consumer gets its own Q/DQ pair, so a node kept fp32 (an excluded LP beside
# the q/k/v projections that share its input) reads the fp32 tensor, not the shared DQ's output.
QDQ_EXTRA_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                     "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"], "DedicatedQDQPair": True}
# int8 targets: "tensorrt" = symmetric int8 activations (zero point 0), the only form TensorRT builds;
# "onnxruntime" = asymmetric uint8 activations (U8S8), the form onnxruntime's x86 int8 kernels run
# fast. onnxruntime fuses int8 (S8S8) activations on x86 only by first turning them into uint8, which it
# cannot do for a tensor read by several MatMuls, so the tensorrt form runs there about as fast as fp32.
INT8_TARGETS = ("tensorrt", "onnxruntime")
ACTIVATION_FORM = {"tensorrt": "int8 symmetric per-tensor (zero point 0)", "onnxruntime": "uint8 asymmetric per-tensor"}
CALIB_EXTRA_OPTIONS = {"percentile": {"CalibPercentile": 99.999}, "entropy": {}, "minmax": {}}
# ops whose fp16 form loses accuracy (exp and sums over many terms, variance; Pow/Sqrt/Reciprocal are a
# decomposed layer norm's): kept fp32 in --fp16
FP16_KEEP_OP_TYPES = ("Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
                      "LayerNormalization", "SimplifiedLayerNormalization", "Pow", "Sqrt", "Reciprocal")
QUANTIZED_MARKERS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearMatMul",
                     "MatMulInteger", "QLinearConv", "ConvInteger", "MatMulNBits", "QGemm")
PASS_THROUGH = ("Reshape", "Transpose", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten")
ADAPTER_PRECISIONS = ("int8", "fp16", "fp32")


@dataclass
class AdapterSite:
    """One dynamic Lily layer in the graph: its HPMix node and the nodes that belong to it."""

    hpmix: str  # the lily::HPMix node's name (before inlining)
    layer: str  # the module path, when the exporter recorded it
    lp: Optional[str] = None  # MatMul h = x A^T
    router: Optional[str] = None  # MatMul h R^T
    hp_matmuls: list[str] = field(default_factory=list)  # body MatMuls on h (h @ B~)
    softmax: list[str] = field(default_factory=list)
    mixing: list[str] = field(default_factory=list)  # body nodes not on h: reductions, p @ pool, casts
    hp_path: list[str] = field(default_factory=list)  # other body nodes on h (the final scale)
    state: bool = False  # lily::HPMixState (decoders, prompt/causal): the whole body is routing state and mixing

    @property
    def adapter_matmuls(self) -> list[str]:
        return [n for n in (self.lp, self.router) if n] + self.hp_matmuls

    @property
    def always_fp32(self) -> list[str]:
        return self.softmax + self.mixing


def quantized_reason(model) -> Optional[str]:
    """Why ``model`` is already quantized (Q/DQ or integer ops, fp16 weights), or None."""
    import onnx

    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    ops = sorted({n.op_type for n in nodes if n.op_type in QUANTIZED_MARKERS})
    if ops:
        count = sum(1 for n in nodes if n.op_type in QUANTIZED_MARKERS)
        return f"it has {count} quantization nodes ({', '.join(ops)})"
    low = [t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)]
    if low:
        return f"it has {len(low)} fp16/bf16 initializers (e.g. {low[0]})"
    for p in model.metadata_props:
        if p.key == "lily_deploy.precision" and p.value not in ("fp32", ""):
            return f"its metadata says lily_deploy.precision = {p.value}"
    return None


def _layer_name(node) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = re.findall(r"'([^']*)'", p.value)
            if len(scopes) >= 2:
                return re.sub(r"^deploy\.model\.", "", scopes[-2])
    return node.name


def _producer_matmul(name: str, producers: dict) -> Optional[str]:
    """The MatMul/Gemm a tensor comes from, looking through shape-only ops."""
    seen = 0
    while name in producers and seen < 8:
        node = producers[name]
        if node.op_type in QUANTIZED_OP_TYPES:
            return node.name
        if node.op_type not in PASS_THROUGH or not node.input:
            return None
        name, seen = node.input[0], seen + 1
    return None


def inline_functions(model):
    """Inline every model-local function and name every node; returns ``(model, sites)``.

    ``sites`` maps each ``lily::HPMix`` node (recorded before inlining) to its LP, router, HP
    MatMuls and mixing-vector nodes, by the names they carry after inlining
    (``<hpmix node>/<body tensor>``). ``lily::HPMixState`` (a decoder's routing state) stays a
    function call: its body is routing state and mixing, kept fp32 whole, and its ``If``
    branches read tensors from the outer scope, which FP16 converters do not follow.
    """
    import onnx
    import onnx.inliner

    from ..converters.hpmix import DOMAIN, STATE_OP_TYPE

    model = onnx.ModelProto.FromString(model.SerializeToString())
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = _unique(f"{n.op_type}_{i}", used)
    calls = _hpmix_calls(model)
    sites = [site for site, _ in calls]
    if not model.functions:
        return model, sites
    kept = [(f.domain, f.name) for f in model.functions if (f.domain, f.name) == (DOMAIN, STATE_OP_TYPE)]
    inlined = onnx.inliner.inline_selected_functions(model, kept, exclude=True)
    called = {(n.domain, n.op_type) for n in inlined.graph.node}
    functions = [f for f in inlined.functions if (f.domain, f.name) in kept and (f.domain, f.name) in called]
    del inlined.functions[:]
    inlined.functions.extend(functions)
    if not functions:
        keep = [o for o in inlined.opset_import if o.domain != DOMAIN]
        del inlined.opset_import[:]
        inlined.opset_import.extend(keep)
    nodes = list(inlined.graph.node)
    producers = {o: n for n in nodes for o in n.output}
    order = {id(n): i for i, n in enumerate(nodes)}  # graph order is topological
    for site, (inputs, outputs) in calls:
        if site.state:
            site.mixing = [site.hpmix]
            continue
        _sort_body(site, inputs[0], _body_nodes(outputs, producers, order), used)
    for i, n in enumerate(inlined.graph.node):  # nested or foreign functions: name what is left
        if not n.name:
            n.name = _unique(f"{n.op_type}_inlined_{i}", used)
    return inlined, sites


def _hpmix_calls(model) -> list[tuple[AdapterSite, tuple[list[str], list[str]]]]:
    """Each HPMix node as a site with its LP and router (found by position, before inlining),
    with the tensors its body is traced between after inlining: its inputs (``h`` first) and outputs."""
    from ..converters.hpmix import DOMAIN, OP_TYPE, STATE_OP_TYPE

    producers = {o: n for n in model.graph.node for o in n.output}
    calls = []
    for n in model.graph.node:
        if n.domain == DOMAIN and (n.op_type in (OP_TYPE, STATE_OP_TYPE) or n.op_type.startswith(OP_TYPE + "_")):
            site = AdapterSite(n.name, _layer_name(n), lp=_producer_matmul(n.input[0], producers),
                               router=_producer_matmul(n.input[1], producers), state=n.op_type == STATE_OP_TYPE)
            calls.append((site, (list(n.input), list(n.output))))
    return calls


def _sort_body(site: AdapterSite, h: str, body: list, used: set) -> None:
    """Name an inlined HPMix body's nodes after the site and sort them: softmax, HP MatMuls
    (MatMuls on ``h``), the rest of the ``h`` path, and the mixing-vector nodes."""
    on_h = {h}
    for n in reversed(body):  # body is in reverse topological order; walk it forwards
        if any(i in on_h for i in n.input):
            on_h.update(n.output)
    for n in body:
        n.name = _unique(f"{site.hpmix}/{re.sub(r'__[0-9]+$', '', n.output[0]) or n.op_type}", used)
    for n in reversed(body):
        if n.op_type == "Softmax":
            site.softmax.append(n.name)
        elif n.op_type in QUANTIZED_OP_TYPES and any(i in on_h for i in n.input):
            site.hp_matmuls.append(n.name)
        elif any(i in on_h for i in n.input):
            site.hp_path.append(n.name)
        else:
            site.mixing.append(n.name)


def _body_nodes(outputs: Sequence[str], producers: dict, order: dict) -> list:
    """The unnamed (inlined) nodes that compute ``outputs``, in reverse topological order."""
    out, stack, seen = [], list(outputs), set()
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or node.name or id(node) in seen:
            continue
        seen.add(id(node))
        out.append(node)
        stack.extend(list(node.input) + outer_inputs(node))
    return sorted(out, key=lambda n: -order[id(n)])  # consumers first: reversed() runs forwards


def outer_inputs(node) -> list[str]:
    """The outer-scope tensors the subgraphs of ``node`` (If, Loop, Scan) read without declaring them."""
    names: list[str] = []
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                names += [i for i in list(n.input) + outer_inputs(n) if i and i not in local]
                local.update(n.output)
    return list(dict.fromkeys(names))


def _unique(name: str, used: set) -> str:
    base, k = name, 1
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def strip_custom_domain(model) -> None:
    """Drop the custom-domain opset import when no node uses it any more."""
    from ..converters.hpmix import DOMAIN

    if any(n.domain == DOMAIN for n in model.graph.node):
        return
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def resolve_exclusions(model, exclude_nodes: Sequence[str], exclude_op_types: Sequence[str]) -> list[str]:
    """Node names for ``exclude_nodes`` and ``exclude_op_types``; names the graph lacks are
    :class:`ConfigError` (known only once the graph is inlined, so not in a config's validate)."""
    names = {n.name for n in model.graph.node}
    ops = {n.op_type for n in model.graph.node}
    for name in exclude_nodes:
        if name not in names:
            similar = sorted(n for n in names if name.lower() in n.lower())[:3]
            hint = f" (did you mean {', '.join(similar)}?)" if similar else ""
            raise ConfigError("exclude_nodes", f"no node named {name!r} in the graph{hint}")
    for op in exclude_op_types:
        if op not in ops:
            raise ConfigError("exclude_op_types", f"the graph has no {op} nodes "
                              f"(it has {', '.join(sorted(ops)[:12])}, ...)")
    chosen = list(dict.fromkeys(list(exclude_nodes) +
                                [n.name for n in model.graph.node if n.op_type in set(exclude_op_types)]))
    return chosen


def calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    if name not in table:
        raise ConfigError("calib_method", f"{name!r}: choose one of {', '.join(CALIB_METHODS)}")
    return table[name]


@dataclass
class Plan:
    """What one precision conversion quantizes and what it keeps in fp32, by node name."""

    precision: str
    adapter_precision: str
    sites: list[AdapterSite]
    excluded_user: list[str]
    kept_fp32: dict[str, list[str]]  # reason -> node names

    def excluded(self) -> list[str]:
        return list(dict.fromkeys(n for names in self.kept_fp32.values() for n in names))


def int8_plan(model, sites: list[AdapterSite], adapter_precision: str, user: list[str]) -> Plan:
    kept = _routing_kept(sites)
    if adapter_precision == "fp32":
        kept["adapter MatMuls (--adapter-precision fp32)"] = [n for s in sites for n in s.adapter_matmuls]
    kept["--exclude-nodes/--exclude-op-types"] = user
    return Plan("int8", adapter_precision, sites, user, {k: v for k, v in kept.items() if v})


def quantize_int8(model, reader, method: str, plan: Plan, output_path: str,
                  ranges_cache: Optional[str] = None, target: str = "tensorrt") -> dict:
    """``quantize_static`` with the TensorRT-ready settings; writes ``output_path``; returns a summary.

    ``ranges_cache``: a JSON file of calibrated ranges, written by the first call and read by the
    next (a second pass with more exclusions then skips calibration).
    """
    import logging

    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if target not in INT8_TARGETS:
        raise ConfigError("int8_target", f"{target!r}: choose one of {', '.join(INT8_TARGETS)}")
    tensorrt = target == "tensorrt"
    excluded = set(plan.excluded())
    op_types = [t for t in QUANTIZED_OP_TYPES
                if any(n.op_type == t and n.name not in excluded for n in model.graph.node)]
    if not op_types:
        raise LilyDeployError("nothing left to quantize: every MatMul/Gemm is excluded")
    targets = [n.name for n in model.graph.node if n.op_type in op_types and n.name not in excluded]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs advice (pre-processing) on the root logger
    try:
        work = onnx.ModelProto()
        work.CopyFrom(model)  # quantize_static moves the weights of the proto it is given to external data
        quantize_static(
            work, output_path, reader,
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=op_types, nodes_to_exclude=sorted(excluded),
            calibrate_method=calibration_method(method),
            extra_options={**QDQ_EXTRA_OPTIONS, "ActivationSymmetric": tensorrt, **CALIB_EXTRA_OPTIONS[method]},
            calibration_cache_path=ranges_cache,
        )
    finally:
        root.setLevel(level)
    return {"quantized_candidates": len(targets), "op_types": op_types}


STATE_KEY = "routing state, softmax and mixing (lily::HPMixState, fp32 body)"
FP32_CASTS_KEY = "the graph's own fp32 casts and rotary angles"


def _routing_kept(sites: list[AdapterSite]) -> dict[str, list[str]]:
    """The nodes every precision keeps fp32: router softmax, mixing vector, a decoder's routing state."""
    return {
        "softmax (router)": [n for s in sites for n in s.softmax],
        "mixing vector": [n for s in sites if not s.state for n in s.mixing],
        STATE_KEY: [n for s in sites if s.state for n in s.mixing],
    }


def fp32_islands(model) -> list[str]:
    """Nodes an FP16 graph keeps fp32 on purpose: the exporter's casts to fp32 (RMSNorm's upcast, the
    rotary positions) and the rotary angles (``position * inv_freq`` to Cos/Sin: positions in the
    hundreds have no fp16 precision left for the angle)."""
    import onnx

    float_casts = [n for n in model.graph.node if n.op_type == "Cast"
                   and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]
    float_casts += [n for n in model.graph.node if n.op_type == "ConstantOfShape"  # its dtype is its value's
                    and all(a.t.data_type == onnx.TensorProto.FLOAT for a in n.attribute if a.name == "value")]
    reach = {t.name for t in model.graph.initializer if "inv_freq" in t.name}
    angles = []
    for n in model.graph.node:  # graph order is topological: forwards from inv_freq up to Cos/Sin
        if any(i in reach for i in n.input):
            angles.append(n)
            if n.op_type not in ("Cos", "Sin"):
                reach.update(n.output)
    return list(dict.fromkeys(n.name for n in float_casts + angles))


def fp16_plan(model, sites: list[AdapterSite], adapter_precision: str, user: list[str],
              keep_sensitive: bool = True) -> Plan:
    kept = _routing_kept(sites)
    kept[FP32_CASTS_KEY] = fp32_islands(model)
    if adapter_precision == "fp32":
        kept["adapter (--adapter-precision fp32)"] = [n for s in sites for n in s.adapter_matmuls + s.hp_path]
    if keep_sensitive:
        in_sites = {n for names in kept.values() for n in names}
        kept["numerically sensitive ops"] = [n.name for n in model.graph.node
                                             if n.op_type in FP16_KEEP_OP_TYPES and n.name not in in_sites]
    kept["--exclude-nodes/--exclude-op-types"] = user
    return Plan("fp16", adapter_precision, sites, user, {k: v for k, v in kept.items() if v})


def convert_fp16(model, plan: Plan):
    """fp16 weights and activations with fp32 inputs/outputs; the plan's nodes stay fp32."""
    import warnings

    from onnxconverter_common import float16

    model, fenced = _outputs_apart(model, set(plan.excluded()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values truncated to fp16 range" per tensor; summarised by validation
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST),
            node_block_list=plan.excluded() + fenced,
        )
    _float_outputs(converted, {o.name for o in model.graph.output if o.type.tensor_type.elem_type == 1})
    return converted


def _float_outputs(model, names: set) -> None:
    """Outputs that were fp32 stay fp32: after a node kept fp32 the converter may end an output in a
    Cast to fp16 (an fp32 -> fp32 Cast then)."""
    import onnx

    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        if out.name in names and out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            node = producers.get(out.name)
            if node is not None and node.op_type == "Cast":
                for a in node.attribute:
                    if a.name == "to":
                        a.i = onnx.TensorProto.FLOAT
            out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def _outputs_apart(model, blocked: set):
    """A copy where no node reads a graph output, nor does a ``blocked`` node write one: each such
    output gets an internal twin and an Identity to the output; returns ``(model, Identity nodes
    to keep fp32)`` (those after a blocked node).

    A decoder's ``present.*`` keys and values are outputs that later nodes read too (grouped-query
    attention repeats them); the FP16 converter casts an output back to fp32 in place, so its
    readers would get the fp32 tensor their fp16 types do not expect; and it declares the output
    of a node kept fp32 (the routing state) fp16.
    """
    import onnx

    outputs = {o.name for o in model.graph.output}
    read = {i for n in model.graph.node for i in n.input} & outputs
    from_blocked = {o for n in model.graph.node if n.name in blocked for o in n.output} & outputs
    read |= from_blocked
    if not read:
        return model, []
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for n in model.graph.node:
        for k, name in enumerate(n.output):
            if name in read:
                n.output[k] = f"{name}/internal"
        for k, name in enumerate(n.input):
            if name in read:
                n.input[k] = f"{name}/internal"
    for name in sorted(read):
        model.graph.node.append(onnx.helper.make_node("Identity", [f"{name}/internal"], [name], name=f"{name}/output"))
    kept = [v for v in model.graph.value_info if v.name not in read]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model, [f"{name}/output" for name in sorted(from_blocked)]  # fp32 like their producers


def count_quantized(model) -> dict:
    """Q/DQ counts and the MatMul/Gemm nodes that read a DequantizeLinear (i.e. run as int8)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    q = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
    dq = sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear")
    int8 = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES
            and all(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input[:2])]
    return {"quantize_linear": q, "dequantize_linear": dq, "int8_matmuls": int8}


def quantized_activations(model) -> dict[str, list[tuple[str, str, str]]]:
    """For each int8 MatMul/Gemm of a Q/DQ graph: its activation inputs as (tensor, scale, zero point)."""
    inits = {t.name for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, list[tuple[str, str]]] = {}
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OP_TYPES:
            continue
        for i in n.input[:2]:
            dq = producers.get(i)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[1] in inits:
                out.setdefault(n.name, []).append((q.input[0], q.input[1], q.input[2] if len(q.input) > 2 else ""))
    return out


def activation_sqnr(fp32_model, quantized_model, batches) -> dict[str, float]:
    """Signal-to-quantization-noise ratio (dB) of each int8 MatMul's activation inputs, on ``batches``.

    Each input is run in fp32, quantized with the scale and zero point calibration chose
    (round-half-even, saturating as QuantizeLinear does) and compared with itself: the loss of
    that one tensor, not the error accumulated from earlier layers. A node scores its worst
    input. Heavy-tailed activations (a few outlier channels stretch the range) score low.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from ..runtime.ort import ort_session

    acts = quantized_activations(quantized_model)
    scales = {t.name: numpy_helper.to_array(t) for t in quantized_model.graph.initializer}
    tensors = sorted({x for pairs in acts.values() for x, _, _ in pairs})
    if not tensors:
        return {}
    probe = onnx.ModelProto.FromString(fp32_model.SerializeToString())
    have = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in have:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    # optimisation off: keep every tensor observable
    session = ort_session(probe.SerializeToString(), opt_level="disable")
    params = {}
    for pairs in acts.values():
        for x, s, z in pairs:
            zp = np.asarray(scales[z]) if z in scales else np.zeros((), np.int8)
            info = np.iinfo(zp.dtype)
            params[x] = (float(np.asarray(scales[s]).reshape(-1)[0]), float(zp.reshape(-1)[0]), info.min, info.max)
    signal = dict.fromkeys(tensors, 0.0)
    noise = dict.fromkeys(tensors, 0.0)
    for batch in batches:
        for name, x in zip(tensors, session.run(tensors, batch)):
            x = x.astype(np.float64, copy=False)
            s, z, lo, hi = params[name]
            q = (np.clip(np.round(x / s) + z, lo, hi) - z) * s
            signal[name] += float((x * x).sum())
            noise[name] += float(((x - q) ** 2).sum())
    db = {t: 10.0 * np.log10(max(signal[t], 1e-30) / max(noise[t], 1e-30)) for t in tensors}
    return {node: round(min(db[x] for x, _, _ in pairs), 2) for node, pairs in acts.items()}
