"""The ``lily::HPMix`` custom op, in one place.

HP mixing is the only part of Lily that is not a plain matmul: the router's softmax
probabilities are averaged into a mixing vector ``p`` (per batch, per sample or per
token), the shared HP pool is mixed by ``p``, and the low-rank hidden ``h`` is
projected through the mix. This module holds every form of that one computation:

* :func:`~lily_deploy.core.lily.hp_mix_reference` -- differentiable torch, used for training and eager
  inference (it lives with the Lily layer in ``core``; re-exported here);
* ``torch.ops.lily.hp_mix`` -- the same as an opaque torch custom op (with a fake kernel),
  so the ONNX exporter sees ONE node per layer;
* the ONNX translation (a bare ``lily::HPMix`` node) and the FunctionProto bodies per
  routing mode, built from standard ops only (MatMul, Softmax, ReduceMean, ...; no Einsum),
  so onnxruntime and TensorRT's parser run it by inlining;
* the TensorRT plugin attributes for the optional plugin route.

Shapes: ``h [..., r]``, ``logits [..., E]``, HP pool ``hp [E*r, d_out]`` (PEFT's layout of
``lily_B.weight``), optional ``mask [B, T]``; output ``[..., d_out]`` already scaled.
"""
from __future__ import annotations

from typing import Optional

import torch

# the routing math lives with the Lily layer in core; the op wraps it (names re-exported for callers of the op)
from ..core.lily import hp_mix_reference, hp_mix_stateful, mix_pool, mixing_vectors  # noqa: F401
from ..core.modes import DYNAMIC_MODES, MODES, STATE_MODES  # noqa: F401


DOMAIN = "lily"
OP_TYPE = "HPMix"
STATE_OP_TYPE = "HPMixState"  # the decoder modes (prompt, causal): a routing state in and out
DOMAIN_VERSION = 1


@torch.library.custom_op("lily::hp_mix", mutates_args=())
def hp_mix(
    h: torch.Tensor,
    logits: torch.Tensor,
    hp: torch.Tensor,
    mask: Optional[torch.Tensor],
    mode: str,
    scale: float,
) -> torch.Tensor:
    """Opaque form of :func:`hp_mix_reference` (what the exporter turns into ``lily::HPMix``)."""
    return hp_mix_reference(h, logits, hp, mask, mode, scale).contiguous()


@hp_mix.register_fake
def _hp_mix_fake(h, logits, hp, mask, mode, scale):
    return h.new_empty((*h.shape[:-1], hp.shape[-1]))


@torch.library.custom_op("lily::hp_mix_state", mutates_args=())
def hp_mix_state(
    h: torch.Tensor,
    logits: torch.Tensor,
    hp: torch.Tensor,
    mask: Optional[torch.Tensor],
    past: torch.Tensor,
    mode: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Opaque form of :func:`~lily_deploy.core.lily.hp_mix_stateful` (exported as ``lily::HPMixState``)."""
    y, present = hp_mix_stateful(h, logits, hp, mask, past, mode, scale)
    return y.contiguous(), present.contiguous()


@hp_mix_state.register_fake
def _hp_mix_state_fake(h, logits, hp, mask, past, mode, scale):
    return h.new_empty((*h.shape[:-1], hp.shape[-1])), past.new_empty(past.shape)


# --------------------------------------------------------------------------------------
# ONNX: schema, translation of the torch op into one lily::HPMix node, function bodies
# --------------------------------------------------------------------------------------

def register_onnx_schema() -> None:
    """Register ``lily::HPMix`` with onnx so the exporter and the checker know its signature."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_TYPE, DOMAIN) and onnx.defs.has(STATE_OP_TYPE, DOMAIN):
        return
    param = OpSchema.FormalParameter
    schema = OpSchema(
        OP_TYPE, DOMAIN, DOMAIN_VERSION,
        doc="Lily HP mixing: y = scale * h @ sum_e p_e HP_e, p from softmax(router_logits) by routing `mode`.",
        inputs=[
            param("h", "T", "low-rank hidden h = x A^T, [..., r]"),
            param("router_logits", "T", "router logits h R^T, [..., E]"),
            param("hp", "T", "HP pool, [E*r, d_out]"),
            param("mask", "M", "token mask [B, T] (sample mode)", param_option=OpSchema.FormalParameterOption.Optional),
        ],
        outputs=[param("y", "T", "scaled adapter output, [..., d_out]")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types"),
            ("M", ["tensor(int64)", "tensor(int32)", "tensor(bool)", "tensor(float)", "tensor(float16)"], "mask types"),
        ],
        attributes=[
            OpSchema.Attribute("mode", OpSchema.AttrType.STRING, "routing mode: batch, sample or token"),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "Lily scaling s"),
        ],
    )
    onnx.defs.register_schema(schema)
    onnx.defs.register_schema(OpSchema(
        STATE_OP_TYPE, DOMAIN, DOMAIN_VERSION,
        doc="Lily HP mixing for decoders under a KV cache: prompt (mean over the prompt, frozen) or causal "
            "(running mean) routing, with the routing state [B, E+1] (masked probability sum, count) in and out.",
        inputs=[
            param("h", "T", "low-rank hidden h = x A^T, [B, T, r]"),
            param("router_logits", "T", "router logits h R^T, [B, T, E]"),
            param("hp", "T", "HP pool, [E*r, d_out]"),
            param("mask", "M", "tokens that count, [B, T]"),
            param("past_state", "T", "routing state after the earlier tokens, [B, E+1]"),
        ],
        outputs=[param("y", "T", "scaled adapter output, [B, T, d_out]"),
                 param("present_state", "T", "routing state after these tokens, [B, E+1]")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types"),
            ("M", ["tensor(int64)", "tensor(int32)", "tensor(bool)", "tensor(float)", "tensor(float16)"], "mask types"),
        ],
        attributes=[
            OpSchema.Attribute("mode", OpSchema.AttrType.STRING, "routing mode: prompt or causal"),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "Lily scaling s"),
        ],
    ))


def onnx_translation():
    """``custom_translation_table`` entry for ``torch.onnx.export``: one bare ``lily::HPMix`` node."""
    import onnxscript

    register_onnx_schema()
    lily = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def translate(h, logits, hp, mask=None, mode: str = "sample", scale: float = 1.0):
        if mask is None:
            return lily.HPMix(h, logits, hp, mode=mode, scale=scale)
        return lily.HPMix(h, logits, hp, mask, mode=mode, scale=scale)

    def translate_state(h, logits, hp, mask, past, mode: str = "prompt", scale: float = 1.0):
        return lily.HPMixState(h, logits, hp, mask, past, mode=mode, scale=scale)

    return {torch.ops.lily.hp_mix.default: translate, torch.ops.lily.hp_mix_state.default: translate_state}


def _body_builder():
    """``(nodes, node, ints)``: the node list of a function body, an op adder and an int64-constant adder."""
    import onnx
    from onnx import helper

    nodes = []

    def node(op, inputs, outputs, **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0]

    def ints(name, values):
        return node("Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64, [len(values)], values))

    return nodes, node, ints


def _scale_from_attribute():
    """A Constant ``scale_f`` whose value is the calling node's ``scale`` attribute (an attribute reference)."""
    import onnx
    from onnx import helper

    scale_node = helper.make_node("Constant", [], ["scale_f"])
    scale_node.attribute.append(helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT))
    scale_node.attribute[0].ref_attr_name = "scale"
    return scale_node


def inline_bodies(model):
    """``--ops standard``: the model with every ``lily::`` function inlined and the custom domain dropped."""
    import onnx.inliner

    model = onnx.inliner.inline_local_functions(model)
    del model.functions[:]
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def function_body(mode: str, masked: bool, opset: int, rank: int, num_hp: int):
    """The FunctionProto ``lily::HPMix`` for one variant, from standard ops of ``opset`` only.

    ``rank`` and ``num_hp`` are the same for every layer of a Lily model (one config), so the
    body reshapes with constant shapes (``0`` copies a dim, ``-1`` infers ``d_out``), which
    onnxruntime and TensorRT fold at load time instead of computing shapes per call.
    ``masked``: the node passes the token mask (sample mode).
    """
    from onnx import helper

    nodes, node, ints = _body_builder()

    inputs = ["h", "router_logits", "hp"] + (["mask"] if masked else [])
    # s * h @ B~(p) == h @ B~(s * p): scaling the few mixing weights, not the [..., d] output
    nodes.append(_scale_from_attribute())
    probs = node("Softmax", ["router_logits"], ["probs"], axis=-1)  # [..., E]
    scale_t = node("CastLike", ["scale_f", probs], ["scale_t"])
    if mode == "token":
        # sum_e P_e (h @ HP_e) == (P (x) h) @ HP: one matmul on the stacked pool
        scaled = node("Mul", [probs, scale_t], ["probs_scaled"])
        p4 = node("Unsqueeze", [scaled, ints("minus1", [-1])], ["probs_u"])  # [..., E, 1]
        h4 = node("Unsqueeze", ["h", ints("minus2", [-2])], ["h_u"])  # [..., 1, r]
        z = node("Mul", [p4, h4], ["z"])  # [..., E, r]
        lead = node("Shape", ["h"], ["lead"], end=-1)
        zshape = node("Concat", [lead, ints("er", [num_hp * rank])], ["zshape"], axis=0)
        zflat = node("Reshape", [z, zshape], ["zflat"])  # [..., E*r]
        node("MatMul", [zflat, "hp"], ["y"])  # [..., d]
    else:
        pool = node("Reshape", ["hp", ints("pool_shape", [num_hp, -1])], ["pool"])  # [E, r*d]
        if mode == "batch":
            flat = node("Reshape", [probs, ints("flat_shape", [-1, num_hp])], ["probs_flat"])  # [N, E]
            p = node("ReduceMean", [flat, ints("axis0", [0])], ["p"], keepdims=1)  # [1, E]
            p = node("Mul", [p, scale_t], ["p_scaled"])
            b_flat = node("MatMul", [p, pool], ["b_flat"])  # [1, r*d]
            b_mix = node("Reshape", [b_flat, ints("b_shape", [rank, -1])], ["b_mix"])  # [r, d]
        elif mode == "sample":
            axis1 = ints("axis1", [1])
            if masked:
                # p = s * sum_t w_t P_t with w = mask / max(count, 1): one [B,1,T] @ [B,T,E] MatMul per layer.
                # w depends on the mask and s only, the same in every layer, so onnxruntime computes it once
                # (common-subexpression elimination across the inlined bodies).
                m = node("CastLike", ["mask", probs], ["m"])  # [B, T]
                den = node("ReduceSum", [m, axis1], ["den"], keepdims=1)  # [B, 1]
                one = node("CastLike", [node("Constant", [], ["one_f"], value_float=1.0), probs], ["one_t"])
                w = node("Div", [node("Mul", [m, scale_t], ["m_scaled"]), node("Max", [den, one], ["den_safe"])],
                         ["w"])  # [B, T]
                w3 = node("Unsqueeze", [w, axis1], ["w3"])  # [B, 1, T]
                p = node("MatMul", [w3, probs], ["p_scaled"])  # [B, 1, E]
            else:
                p = node("ReduceMean", [probs, axis1], ["p"], keepdims=1)  # [B, 1, E]
                p = node("Mul", [p, scale_t], ["p_scaled"])
            b_flat = node("MatMul", [p, pool], ["b_flat"])  # [B, 1, r*d]
            b_mix = node("Reshape", [b_flat, ints("b_shape", [0, rank, -1])], ["b_mix"])  # [B, r, d]
        else:
            raise ValueError(f"no ONNX body for routing mode {mode!r}")
        node("MatMul", ["h", b_mix], ["y"])  # [..., d]
    return helper.make_function(
        DOMAIN, OP_TYPE, inputs, ["y"], nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["mode", "scale"],
    )


def state_function_body(mode: str, opset: int, rank: int, num_hp: int):
    """The FunctionProto ``lily::HPMixState`` for ``prompt`` or ``causal``, from standard ops only.

    The state ``[B, E+1]`` is (masked sum of router probabilities, token count). ``prompt``: a
    sample whose past count is zero is at its prompt, so its unmasked tokens join the mean; later
    tokens reuse the frozen mean. ``causal``: CumSum over the sequence gives each token the mean
    over the tokens up to it, continuing from the past sums.
    """
    import onnx
    from onnx import helper

    nodes, node, ints = _body_builder()

    nodes.append(_scale_from_attribute())
    probs = node("Softmax", ["router_logits"], ["probs"], axis=-1)  # [B, T, E]
    scale_t = node("CastLike", ["scale_f", probs], ["scale_t"])
    one = node("CastLike", [node("Constant", [], ["one_f"], value_float=1.0), probs], ["one_t"])
    past = node("CastLike", ["past_state", probs], ["past"])
    past_sum = node("Slice", [past, ints("s0", [0]), ints("sE", [num_hp]), ints("ax1", [1])], ["past_sum"])  # [B, E]
    past_count = node("Slice", [past, ints("sE2", [num_hp]), ints("sE1", [num_hp + 1]), "ax1"], ["past_count"])
    m = node("CastLike", ["mask", probs], ["m"])  # [B, T]
    if mode == "prompt":
        zero = node("CastLike", [node("Constant", [], ["zero_f"], value_float=0.0), probs], ["zero_t"])
        fresh = node("CastLike", [node("LessOrEqual", [past_count, zero], ["fresh_b"]), probs], ["fresh"])  # [B, 1]
        m = node("Mul", [m, fresh], ["m_prompt"])
        m3 = node("Unsqueeze", [m, ints("minus1", [-1])], ["m3"])  # [B, T, 1]
        total = node("Add", [past_sum, node("ReduceSum", [node("Mul", [probs, m3], ["pm"]), "ax1"], ["pm_sum"],
                                            keepdims=0)], ["total"])  # [B, E]
        count = node("Add", [past_count, node("ReduceSum", [m3, "ax1"], ["m_sum"], keepdims=0)], ["count"])  # [B, 1]
        p = node("Div", [total, node("Max", [count, one], ["count_safe"])], ["p"])
        pool = node("Reshape", ["hp", ints("pool_shape", [num_hp, -1])], ["pool"])  # [E, r*d]
        b_flat = node("MatMul", [node("Mul", [p, scale_t], ["p_scaled"]), pool], ["b_flat"])  # [B, r*d]
        b_mix = node("Reshape", [b_flat, ints("b_shape", [0, rank, -1])], ["b_mix"])  # [B, r, d]
        node("MatMul", ["h", b_mix], ["y"])
        node("Concat", [total, count], ["present_state"], axis=-1)
    elif mode == "causal":
        m3 = node("Unsqueeze", [m, ints("minus1", [-1])], ["m3"])
        seq_axis = node("Constant", [], ["seq_axis"], value=helper.make_tensor("seq_axis", onnx.TensorProto.INT64, [], [1]))
        run_sum = node("Add", [node("Unsqueeze", [past_sum, "ax1"], ["past_sum3"]),
                               node("CumSum", [node("Mul", [probs, m3], ["pm"]), seq_axis], ["pm_cum"])], ["run_sum"])
        run_count = node("Add", [node("Unsqueeze", [past_count, "ax1"], ["past_count3"]),
                                 node("CumSum", [m3, seq_axis], ["m_cum"])], ["run_count"])  # [B, T, 1]
        p = node("Div", [run_sum, node("Max", [run_count, one], ["count_safe"])], ["p"])  # [B, T, E]
        p4 = node("Unsqueeze", [node("Mul", [p, scale_t], ["p_scaled"]), "minus1"], ["p_u"])  # [B, T, E, 1]
        z = node("Mul", [p4, node("Unsqueeze", ["h", ints("minus2", [-2])], ["h_u"])], ["z"])  # [B, T, E, r]
        zflat = node("Reshape", [z, ints("zshape", [0, 0, num_hp * rank])], ["zflat"])
        node("MatMul", [zflat, "hp"], ["y"])
        last = node("Constant", [], ["last"], value=helper.make_tensor("last", onnx.TensorProto.INT64, [], [-1]))
        node("Concat", [node("Gather", [run_sum, last], ["sum_last"], axis=1),
                        node("Gather", [run_count, last], ["count_last"], axis=1)], ["present_state"], axis=-1)
    else:
        raise ValueError(f"no lily::HPMixState body for routing mode {mode!r}")
    return helper.make_function(
        DOMAIN, STATE_OP_TYPE, ["h", "router_logits", "hp", "mask", "past_state"], ["y", "present_state"], nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=["mode", "scale"],
    )


def is_hpmix_op(op_type: str) -> bool:
    """``HPMix``, ``HPMixState`` or a variant's own name (``HPMix_token``, ``HPMix_sample_mask``, ...)."""
    return op_type in (OP_TYPE, STATE_OP_TYPE) or op_type.startswith(OP_TYPE + "_")


def hpmix_nodes(model) -> list:
    """Every ``lily::HPMix`` node (any variant) and ``lily::HPMixState`` node of an ONNX model's main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and is_hpmix_op(n.op_type)]


def variant_op_type(mode: str, masked) -> str:
    """The function name of a variant when one model needs several: ``HPMix_<mode>[_mask]``."""
    if masked == "state":
        return STATE_OP_TYPE
    return f"{OP_TYPE}_{mode}{'_mask' if masked else ''}"


def _node_variant(model, n) -> tuple[str, object]:
    """``(mode, masked)`` of one node (``masked`` is ``"state"`` for HPMixState); a 2-D sample node becomes token."""
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    mode = attrs["mode"].decode() if isinstance(attrs["mode"], bytes) else attrs["mode"]
    if n.op_type == STATE_OP_TYPE:
        return mode, "state"
    masked = len(n.input) > 3 and n.input[3] != ""
    if mode == "sample" and not masked and _input_rank(model, n.input[0]) == 2:
        mode = "token"  # one token per sample: sample routing is token routing
        for a in n.attribute:
            if a.name == "mode":
                a.s = b"token"
    return mode, masked


def attach_function_bodies(model, rank: int, num_hp: int) -> list[str]:
    """Add the FunctionProto every ``lily::HPMix`` node needs; returns the variants used.

    Every dynamic layer of an export shares the routing mode, but not every call sees the same
    inputs: a layer applied to something without the token mask (DeBERTa-v2's relative position
    embeddings through ``query_proj``) or to one token per sample needs another body. One
    variant keeps the name ``lily::HPMix`` (the one most nodes use); each other variant gets its
    own function, ``lily::HPMix_<mode>[_mask]``, and its nodes are renamed to call it, so every
    runtime that inlines model-local functions (onnxruntime, TensorRT's parser) runs each node
    with its own body. (IR 10's ``overload`` field would keep one name, but TensorRT's parser
    ignores it.)
    """
    import onnx

    nodes = hpmix_nodes(model)
    if not nodes:
        return []
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    by_variant: dict[tuple, list] = {}
    for n in nodes:
        by_variant.setdefault(_node_variant(model, n), []).append(n)
    plain = [v for v in by_variant if v[1] != "state"]
    main = max(plain, key=lambda v: (len(by_variant[v]), str(v))) if plain else None
    del model.functions[:]
    names = []
    for (mode, masked), members in sorted(by_variant.items(), key=lambda kv: str(kv[0])):
        if masked == "state":
            body = state_function_body(mode, opset, rank, num_hp)
        else:
            body = function_body(mode, masked, opset, rank, num_hp)
            if (mode, masked) != main:
                body.name = variant_op_type(mode, masked)
                register_variant_schema(body.name)
                for n in members:
                    n.op_type = body.name
        model.functions.append(body)
        names.append(f"{mode}+state" if masked == "state" else f"{mode}{'+mask' if masked else ''}")
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return names


def register_variant_schema(op_type: str) -> None:
    """Register a variant's name with onnx (same signature as ``lily::HPMix``) for the checker."""
    import onnx
    from onnx.defs import OpSchema

    register_onnx_schema()
    if onnx.defs.has(op_type, DOMAIN):
        return
    base = onnx.defs.get_schema(OP_TYPE, DOMAIN_VERSION, DOMAIN)
    param = OpSchema.FormalParameter
    onnx.defs.register_schema(OpSchema(
        op_type, DOMAIN, DOMAIN_VERSION, doc=f"A variant of lily::HPMix with its own body: {base.doc}",
        inputs=[param(i.name, i.type_str, i.description, param_option=i.option) for i in base.inputs],
        outputs=[param(o.name, o.type_str, o.description) for o in base.outputs],
        type_constraints=[(c.type_param_str, list(c.allowed_type_strs), c.description) for c in base.type_constraints],
        attributes=[OpSchema.Attribute(a.name, a.type, a.description) for a in base.attributes.values()],
    ))


def _input_rank(model, name: str):
    """Rank of a value in the exporter's shape annotations (None when unknown)."""
    for vi in list(model.graph.value_info) + list(model.graph.input):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None
