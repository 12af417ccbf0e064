"""``export --optimize onnxruntime``: a graph whose attention, LayerNorms and Gelus onnxruntime fuses.

Why not ``onnxruntime.transformers.optimizer`` alone: on our dynamo exports (torch 2.13,
transformers 5) its BERT fuser finds SkipLayerNormalization and BiasGelu but no Attention.
Its attention patterns start from ``Softmax <- Add(mask) <- Mul|Div <- MatMul(q, k^T)``; the
exporter decomposes ``scaled_dot_product_attention`` into ``MatMul(q * sqrt(s), k^T * sqrt(s))``
with the ``Sqrt`` constant-folded away, a ``Where(IsNaN(softmax), 0, softmax)`` guard after the
Softmax and ``Reshape/Transpose`` chains on k that none of its paths accept; and with eager
attention the transformers-5 padding mask is a ``GatherND`` chain none of its mask paths
match. onnxscript's ``ort_fusions`` (the rewriter written for the dynamo exporter's graphs)
fuses that form: SDPA -> MultiHeadAttention -> Attention, SkipLayerNormalization, BiasGelu.

The Lily term must not take part: left in, ``y = (x W + b) + delta`` looks to the fuser like
a projection plus a bias and it folds ``delta`` (a [B, T, d] tensor) into the attention bias,
which is wrong. So the adapter term is lifted out first (its ``lily::HPMix`` branch kept alive
as a temporary graph output, the base projection ``x W`` of an adapted layer too, which keeps
that block at MultiHeadAttention with its own projections), the graph is fused, and the term
is put back where the fused op takes the projection: ``MultiHeadAttention(x W + delta, ..., bias)``
(or ``(x W + delta) + b`` where nothing fused). The result holds onnxruntime-only operators
(domain ``com.microsoft``): it is for onnxruntime, never for TensorRT (``build-trt`` refuses it).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

from .core.errors import LilyDeployError

OPTIMIZE = ("none", "onnxruntime")
META_KEY = "lily_deploy.optimize"
ORT_DOMAIN = "com.microsoft"
LILY_DOMAIN = "lily"
ATTENTION_OPS = ("Attention", "MultiHeadAttention")


def optimize_graph(model, target: str, where: str = "the model"):
    """``model`` (a ModelProto) for ``target`` and a line for the user: as it is for "none", fused for "onnxruntime".

    The metadata is kept and ``lily_deploy.optimize`` records the target, the fused operator
    counts and the tool; a graph in which no attention fused is an error (it would be no faster).
    """
    if target == "none":
        return model, "not optimised: standard ONNX for any runtime"
    if target != "onnxruntime":
        raise LilyDeployError(f"--optimize {target}: choose one of {', '.join(OPTIMIZE)}")
    from .runtime.onnx_io import metadata, set_metadata

    meta = metadata(model)
    lifted = lift_adapter_terms(model)
    fused = _fuse(model)
    restore_adapter_terms(fused, lifted)
    counts = fused_op_counts(fused)
    if not any(counts.get(op) for op in ATTENTION_OPS):
        raise LilyDeployError(f"{where}: --optimize onnxruntime fused no attention ({_counts_line(counts)})")
    import onnxscript

    has_hpmix = any(n.domain == LILY_DOMAIN for n in fused.graph.node)
    meta[META_KEY] = _json({"target": "onnxruntime", "fused": counts, "adapter_terms": len(lifted),
                            "tool": f"onnxscript {onnxscript.__version__} ort_fusions"})
    if not has_hpmix and meta.get("lily_deploy.ops") == "custom":
        meta["lily_deploy.ops"] = "standard"  # the fuser inlines the lily::HPMix bodies
    set_metadata(fused, meta)
    inlined = "; the lily::HPMix bodies are inlined" if lifted and not has_hpmix else ""
    return fused, (f"fused for onnxruntime ({_counts_line(counts)}; {len(lifted)} Lily terms added to their "
                   f"projections{inlined}): for onnxruntime only, build-trt needs --optimize none")


def _json(value) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def _counts_line(counts: dict) -> str:
    return ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "nothing fused"


def fused_op_counts(model) -> dict[str, int]:
    """How many nodes of each onnxruntime-only (``com.microsoft``) operator the graph holds."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node if n.domain == ORT_DOMAIN).items()))


def lift_adapter_terms(model) -> list[tuple[str, str]]:
    """Take every ``base + lily::HPMix(...)`` Add out of ``model`` (in place); return (projection, term) names.

    ``projection`` is the base layer's ``MatMul(x, W)`` output (before its bias): the term goes
    back onto it after fusion. Both stay alive meanwhile as temporary graph outputs.
    """
    from onnx import helper

    graph = model.graph
    lifted = []
    for term, (add, base, projection) in adapter_term_adds(graph).items():
        if projection is None:
            raise LilyDeployError(f"--optimize onnxruntime: the Lily term {term} is not added to a base "
                                  "projection MatMul(x, W) + b; cannot lift it out for fusion")
        _rename_uses(graph, add.output[0], base)
        graph.node.remove(add)
        lifted.append((projection, term))
    for name in {n for pair in lifted for n in pair}:
        graph.output.append(helper.make_empty_tensor_value_info(name))
    return lifted


def adapter_term_adds(graph) -> dict:
    """``term -> (add, base, projection)`` for every ``base + lily::HPMix(...)`` Add of ``graph``.

    ``base`` is the Add's other input (the base layer's ``x W + b``), ``projection`` the ``MatMul(x, W)``
    output under it (None when there is none): where a rewrite finds the base layer of a Lily term.
    """
    producer = {o: n for n in graph.node for o in n.output}
    terms = {n.output[0] for n in graph.node if n.domain == LILY_DOMAIN}
    found = {}
    for add in (n for n in graph.node if n.op_type == "Add" and set(n.input) & terms):
        term = next(i for i in add.input if i in terms)
        base = next((i for i in add.input if i != term), None)
        found[term] = (add, base, _projection(producer, base))
    return found


def _projection(producer: dict, base: Optional[str]) -> Optional[str]:
    """The ``MatMul`` output under ``base = MatMul(x, W) + b`` (or ``base`` itself if it is a MatMul)."""
    node = producer.get(base)
    if node is not None and node.op_type == "MatMul":
        return base
    if node is None or node.op_type != "Add":
        return None
    return next((i for i in node.input if producer.get(i) is not None and producer[i].op_type == "MatMul"), None)


def _rename_uses(graph, old: str, new: str) -> None:
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new
    for out in graph.output:
        if out.name == old:
            out.name = new


def _fuse(model):
    """onnxscript's onnxruntime fusions on a copy of ``model``; returns the fused ModelProto."""
    from onnxscript import ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    graph_ir = ir.serde.deserialize_model(model)
    try:
        graph_ir, _ = optimize_for_ort(graph_ir)
    except Exception as exc:  # a rewriter failure names the rule; keep that line
        raise LilyDeployError(f"--optimize onnxruntime: onnxscript's fusions failed "
                              f"({(str(exc).splitlines() or [''])[0][:300]})") from None
    return ir.serde.serialize_model(graph_ir)


def restore_adapter_terms(model, lifted: list[tuple[str, str]]) -> None:
    """Put each lifted term back onto its projection (``P' = P + term``, every user of P reads P'), in place."""
    from onnx import helper

    graph = model.graph
    temporary = {n for pair in lifted for n in pair}
    kept = [o for o in graph.output if o.name not in temporary]
    del graph.output[:]
    graph.output.extend(kept)
    produced = {o for n in graph.node for o in n.output}
    for projection, term in lifted:
        if projection not in produced:
            raise LilyDeployError(f"--optimize onnxruntime: the projection {projection} was fused away; "
                                  "the Lily term has nowhere to enter")
        joined = f"{projection}.lily"
        _rename_uses(graph, projection, joined)
        graph.node.append(helper.make_node("Add", [projection, term], [joined], name=f"{joined}.add"))
    _topological_sort(graph)


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node follows the producers of its inputs (stable otherwise)."""
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    order, state = [], [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    for start in range(len(nodes)):
        if state[start]:
            continue
        stack = [(start, iter(nodes[start].input))]
        while stack:
            k, inputs = stack[-1]
            state[k] = max(state[k], 1)
            dep = next((producer[i] for i in inputs if i in producer and state[producer[i]] == 0), None)
            if dep is not None:
                stack.append((dep, iter(nodes[dep].input)))
                continue
            stack.pop()
            if state[k] != 2:
                state[k] = 2
                order.append(nodes[k])
    del graph.node[:]
    graph.node.extend(order)


def refuse_for_tensorrt(model, path) -> None:
    """``build-trt`` takes no graph optimised for onnxruntime (its ``com.microsoft`` ops are onnxruntime's)."""
    from .runtime.onnx_io import metadata

    tagged = META_KEY in metadata(model)
    ort_ops = sorted({n.op_type for n in model.graph.node if n.domain == ORT_DOMAIN})
    if ort_ops == ["MatMulNBits"] and not tagged:
        raise LilyDeployError(f"{path}: holds onnxruntime's MatMulNBits (quantize --int4 --int4-target onnxruntime); "
                              "for TensorRT quantize the fp32 graph with --int4 --int4-target tensorrt")
    if tagged or ort_ops:
        what = f"onnxruntime-only ops {', '.join(ort_ops[:4])}" if ort_ops else "an onnxruntime-optimised graph"
        raise LilyDeployError(f"{path}: holds {what} (export --optimize onnxruntime); TensorRT needs the "
                              "graph of a plain export (--optimize none)")
