"""The optional TensorRT plugin route for ``lily::HPMix`` (``build-trt --plugin-route``).

The default route needs none of this: TensorRT's ONNX parser inlines the model-local
FunctionProto of every ``lily::HPMix`` node. With the plugin route, each node gets the
attributes ``plugin_namespace``/``plugin_version``; the parser then hands it to the creator
registered here, an ``IPluginV3`` whose CUDA implementation is torch
(:func:`lily_deploy.converters.hpmix.hp_mix_reference` on the plugin's device buffers, on TensorRT's
stream). The marked graph still runs in onnxruntime (which ignores the extra attributes and
inlines the body), so the same file serves both.

Python-defined plugins live in the process that registers them: an engine built with the
plugin route runs only where this module registers the creator again (the runner does so
when the build report says ``route: plugin``). Some TensorRT builds cannot host a
Python-defined plugin at all (TensorRT-RTX 1.7 aborts the process when the parser adds one);
:func:`register_plugin` finds that out in a child process first and says so instead of
crashing.
"""
from __future__ import annotations

import subprocess
import sys
from typing import Optional, Sequence

import numpy as np

from .hpmix import DOMAIN, OP_TYPE, hp_mix_reference

PLUGIN_NAMESPACE = DOMAIN  # "lily"
PLUGIN_NAME = OP_TYPE  # "HPMix"
PLUGIN_VERSION = "1"
_TYPESTR = {"FLOAT": "<f4", "HALF": "<f2", "INT64": "<i8", "INT32": "<i4", "BOOL": "|b1", "INT8": "|i1"}


# ---------------------------------------------------------------------------------------
# the graph side
# ---------------------------------------------------------------------------------------

def mark_plugin_nodes(model) -> list[str]:
    """Give every ``lily::HPMix`` node the plugin attributes (in place); returns the node names.

    Function bodies stay: onnxruntime ignores the attributes and still inlines them.
    """
    from onnx import helper

    marked = []
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        keep = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.extend([helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
                               helper.make_attribute("plugin_version", PLUGIN_VERSION)])
        marked.append(node.name)
    return marked


# ---------------------------------------------------------------------------------------
# the CUDA implementation (torch on raw device pointers)
# ---------------------------------------------------------------------------------------

class _DeviceBuffer:
    """A raw device pointer dressed as a CUDA array, so torch can view it without copying."""

    def __init__(self, ptr: int, shape: Sequence[int], typestr: str):
        self.__cuda_array_interface__ = {"data": (int(ptr), False), "shape": tuple(int(d) for d in shape),
                                         "typestr": typestr, "version": 3}


def hpmix_on_pointers(inputs: Sequence[tuple[int, Sequence[int], str]], output: tuple[int, Sequence[int], str],
                      stream: int, mode: str, scale: float) -> None:
    """``y = hp_mix(h, logits, hp[, mask])`` from device pointers, enqueued on CUDA stream ``stream``.

    Each of ``inputs``/``output`` is ``(pointer, shape, typestr)``; this is what the plugin's
    ``enqueue`` calls, and what the GPU test calls with torch tensors' pointers.
    """
    import torch

    tensors = [torch.as_tensor(_DeviceBuffer(p, s, t), device="cuda") for p, s, t in inputs]
    out = torch.as_tensor(_DeviceBuffer(*output), device="cuda")
    h, logits, hp = tensors[:3]
    mask = tensors[3] if len(tensors) > 3 else None
    ext = torch.cuda.ExternalStream(int(stream)) if stream else torch.cuda.current_stream()
    with torch.cuda.stream(ext):
        y = hp_mix_reference(h, logits, hp, mask, mode, scale)
        out.copy_(y.to(out.dtype))


# ---------------------------------------------------------------------------------------
# the plugin classes (made per TensorRT flavour: tensorrt and tensorrt_rtx are separate modules)
# ---------------------------------------------------------------------------------------

def _field_str(data) -> str:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data).decode().rstrip("\0")
    if isinstance(data, str):
        return data
    return bytes(np.asarray(data).astype(np.uint8)).decode().rstrip("\0")


def _typestr(desc) -> str:
    """The array-interface type string of a TensorRT tensor description (``DataType.HALF`` -> ``<f2``)."""
    return _TYPESTR[str(desc.type).split(".")[-1]]


def _plugin_fields(trt, mode: Optional[str] = None, scale: Optional[float] = None):
    """The plugin's fields, ``mode`` and ``scale``: with values to serialize, or empty to declare them."""
    return trt.PluginFieldCollection([
        trt.PluginField("mode", np.array([]) if mode is None else np.frombuffer(mode.encode(), dtype=np.int8),
                        trt.PluginFieldType.CHAR),
        trt.PluginField("scale", np.array([]) if scale is None else np.array([scale], dtype=np.float32),
                        trt.PluginFieldType.FLOAT32),
    ])


def plugin_classes(trt):
    """``(HPMixPlugin, HPMixCreator)`` for the TensorRT module ``trt``."""
    plugin = _plugin_class(trt)
    return plugin, _creator_class(trt, plugin)


def _plugin_class(trt):
    """The ``IPluginV3`` for ``lily::HPMix``: shape and type rules for the builder, torch for ``enqueue``."""

    class HPMixPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, mode: str = "sample", scale: float = 1.0, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = 1
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.timing_cache_id = f"{mode}"
            self.mode = mode
            self.scale = float(scale)
            self.phase = phase

        def get_capability_interface(self, type):
            return self

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            out = trt.DimsExprs(inputs[0])
            out[len(out) - 1] = inputs[2][len(inputs[2]) - 1]  # d_out of the HP pool
            return [out]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return desc.type in (trt.DataType.FLOAT, trt.DataType.HALF)
            if pos == 3 and num_inputs == 4:  # the token mask keeps whatever type the graph gives
                return desc.type in (trt.DataType.INT64, trt.DataType.INT32, trt.DataType.BOOL,
                                     trt.DataType.FLOAT, trt.DataType.HALF)
            return desc.type == in_out[0].desc.type

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def get_fields_to_serialize(self):
            return _plugin_fields(trt, self.mode, self.scale)

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            ins = [(ptr, tuple(d.dims), _typestr(d)) for ptr, d in zip(inputs, input_desc)]
            out = (outputs[0], tuple(output_desc[0].dims), _typestr(output_desc[0]))
            hpmix_on_pointers(ins, out, stream, self.mode, self.scale)

        def clone(self):
            other = HPMixPlugin(self.mode, self.scale, self.phase)
            other.__dict__.update(self.__dict__)
            return other

    return HPMixPlugin


def _creator_class(trt, plugin_cls):
    """The creator the parser asks for each marked node: reads ``mode``/``scale`` into a ``plugin_cls``."""

    class HPMixCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.field_names = _plugin_fields(trt)

        def create_plugin(self, name, fc, phase):
            mode, scale = "sample", 1.0
            for f in fc:
                if f.name == "mode":
                    mode = _field_str(f.data)
                elif f.name == "scale":
                    scale = float(np.asarray(f.data).reshape(-1)[0])
            return plugin_cls(mode, scale, phase)

    return HPMixCreator


# ---------------------------------------------------------------------------------------
# registration, with a probe in a child process
# ---------------------------------------------------------------------------------------

_REGISTERED: dict[str, object] = {}
_PROBED: dict[str, Optional[str]] = {}


def probe_graph():
    """A one-node ``lily::HPMix`` graph (token routing) marked for the plugin route.

    It carries no function body on purpose: the node can only be served by the plugin.
    """
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(OP_TYPE, ["h", "logits", "hp"], ["y"], domain=DOMAIN, name="probe_hpmix",
                            mode="token", scale=0.5)
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 4, 2]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 5])],
        [onnx.numpy_helper.from_array(np.ones((6, 5), np.float32), "hp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    mark_plugin_nodes(model)
    return model


def _probe(module_name: str) -> None:
    """Child-process body: register, parse and build the probe graph; print 'ok' on success."""
    import importlib

    trt = importlib.import_module(module_name)
    _, creator_cls = plugin_classes(trt)
    creator = creator_cls()
    trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(probe_graph().SerializeToString()):
        print("parse failed: " + "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors)))
        sys.exit(3)
    if not any(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers)):
        print("the parser inlined the node instead of using the plugin")
        sys.exit(4)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("h", (1, 4, 2), (2, 4, 2), (4, 4, 2))
    profile.set_shape("logits", (1, 4, 3), (2, 4, 3), (4, 4, 3))
    config.add_optimization_profile(profile)
    if hasattr(config, "num_compute_capabilities"):
        import torch

        config.num_compute_capabilities = 1
        config.set_compute_capability(trt.ComputeCapability.CURRENT if torch.cuda.is_available()
                                      else trt.ComputeCapability.SM89, 0)
    if builder.build_serialized_network(network, config) is None:
        print("build failed")
        sys.exit(5)
    print("ok")


def probe_python_plugins(module_name: str, timeout: float = 120.0) -> Optional[str]:
    """None when ``module_name`` can parse and build a Python-plugin node; else why not (one line)."""
    if module_name in _PROBED:
        return _PROBED[module_name]
    code = f"from lily_deploy.converters.trt_plugin import _probe; _probe({module_name!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode == 0 and out and out[-1] == "ok":
        why = None
    elif proc.returncode < 0:
        tail = next((line for line in reversed(out) if line.strip()), "")
        why = f"the process died with signal {-proc.returncode}" + (f" ({tail.strip()})" if tail else "")
    else:
        why = out[-1].strip() if out else f"exit status {proc.returncode}"
    _PROBED[module_name] = why
    return why


def register_plugin(backend, probe: bool = True) -> None:
    """Register the ``lily::HPMix`` creator with ``backend`` (a :class:`lily_deploy.runtime.tensorrt.Backend`)."""
    from ..core.errors import LilyDeployError

    module_name = backend.trt.__name__
    if module_name in _REGISTERED:
        return
    if probe:
        why = probe_python_plugins(module_name)
        if why is not None:
            raise LilyDeployError(
                f"--plugin-route: {backend.pretty} cannot host the Python-defined lily::HPMix plugin here: a probe "
                f"build in a child process failed ({why}); the default route (function inlining) builds this graph")
    _, creator_cls = plugin_classes(backend.trt)
    creator = creator_cls()
    if not backend.trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE):
        raise LilyDeployError(f"--plugin-route: {backend.pretty} refused to register the lily::HPMix creator")
    _REGISTERED[module_name] = creator
