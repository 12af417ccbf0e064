"""Switchable Lily adapters: one base graph (or engine), many adapters chosen per request.

``export --switchable`` traces the model with every adapter tensor of its dynamic Lily layers
as a graph input: the LPs, the routers, the HP pools, and the classification head when the
adapter trains one (PEFT's ``modules_to_save``). Each input is also an initializer holding the
exported adapter's values, so onnxruntime runs the graph as it is and lets an ONNX Runtime
adapter (``.onnx_adapter``, activated per run through ``RunOptions``) override them by name;
TensorRT gets them as engine inputs (``build-trt`` drops the defaults). The graph's metadata
(``lily_deploy.switchable``) lists the tensors with their shapes and a hash of the base weights.

``adapter pack`` turns another adapter of the same shapes into such a file, after checking that
it fits: the same tensor names and shapes, the same base weights, routing and ops. Folded layers
cannot switch (their update is inside ``W0``): a switchable export keeps every layer dynamic.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .core.config import ConfigError, StageConfig
from .core.errors import LilyDeployError
from .runtime.ort import ADAPTER_META, ADAPTER_PREFIX, ADAPTER_SUFFIX, base_tag, check_adapter_fit

__all__ = ["PackConfig", "pack_adapter", "adapter_tensors", "base_sha256", "switchable_graph", "check_switchable",
           "engine_graph"]


@dataclass(frozen=True)
class PackConfig(StageConfig):
    """What :func:`pack_adapter` packs: ``adapter`` (a PEFT-Lily folder or unfolded deploy checkpoint)
    for the switchable ``graph`` (an ONNX file from ``export --switchable``) into ``output``
    (an ``.onnx_adapter`` file); ``base`` overrides the base model the adapter names."""

    adapter: str | Path
    graph: str | Path
    output: str | Path
    base: Optional[str] = None

    def validate(self) -> None:
        if not str(self.adapter or ""):
            raise ConfigError("adapter", "a value is required: a Lily adapter folder or deploy checkpoint")
        if not str(self.graph or "") or not str(self.graph).lower().endswith(".onnx"):
            raise ConfigError("graph", f"{self.graph!r}: give the .onnx file written by export --switchable")
        if not str(self.output or "").endswith(ADAPTER_SUFFIX):
            raise ConfigError("output", f"{self.output!r}: an ONNX Runtime adapter file ends in {ADAPTER_SUFFIX}")


# ---------------------------------------------------------------------------------------
# which tensors switch, and the base they switch on
# ---------------------------------------------------------------------------------------

def check_switchable(deploy, source) -> None:
    """Refuse, in one line, a model that cannot switch: folded layers, no Lily layers, a decoder."""
    if deploy.folded:
        layer = next(iter(deploy.folded))
        raise LilyDeployError(f"{source}: {len(deploy.folded)} Lily layer(s) are folded into their base weights "
                              f"(e.g. {layer}); a folded layer cannot switch adapters: export the adapter folder "
                              "or a checkpoint from fold --fold none")
    if not deploy.layers:
        raise LilyDeployError(f"{source}: has no dynamic Lily layers, so nothing can switch")
    if deploy.task == "causal-lm":
        raise LilyDeployError(f"{source}: switchable adapters are for encoder classifiers so far; "
                              "a decoder exports with its adapter baked in")


def _head_modules(deploy) -> dict[str, nn.Module]:
    """The modules the adapter trains beside Lily (PEFT's ``modules_to_save``), by path in ``deploy.model``."""
    wanted = list(((deploy.meta or {}).get("lily") or {}).get("modules_to_save") or [])
    return {name: m for name, m in deploy.model.named_modules()
            if name and any(name == w or name.endswith("." + w) for w in wanted)}


def adapter_tensors(deploy) -> dict[str, tuple[str, torch.Tensor]]:
    """``{graph input name: (parameter path in deploy.model, tensor)}`` for every switchable tensor.

    Names: ``adapter.lp.<target>.<group>``, ``adapter.router.<layer path>``, ``adapter.hp.<target>``,
    ``adapter.head.<parameter path>``; shared tensors (an LP group, an HP pool) appear once.
    """
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, layer in deploy.layers.items():
        spec = deploy.layer_specs[name]
        lp_name = ADAPTER_PREFIX + "lp." + spec["lp"].replace("/", ".")
        hp_name = ADAPTER_PREFIX + "hp." + spec["hp_pool"].replace("@", ".")
        out.setdefault(lp_name, (f"{name}.lp.weight", layer.lp.weight))
        out[ADAPTER_PREFIX + "router." + name] = (f"{name}.router.weight", layer.router.weight)
        out.setdefault(hp_name, (f"{name}.hp.weight", layer.hp.weight))
    for path, module in _head_modules(deploy).items():
        for pname, p in module.named_parameters():
            out[f"{ADAPTER_PREFIX}head.{path}.{pname}"] = (f"{path}.{pname}", p)
    return out


def base_sha256(deploy) -> str:
    """A hash of the frozen base weights (everything but the adapter's tensors), independent of the targets."""
    switching = {fqn for fqn, _ in adapter_tensors(deploy).values()}
    layers = set(deploy.layers)
    digest = hashlib.sha256()
    for key, t in sorted(deploy.model.state_dict().items()):
        if key in switching or key.endswith(".static_p") or key.endswith((".lp.weight", ".router.weight", ".hp.weight")):
            continue
        owner, _, rest = key.rpartition(".base.")  # a LilyLinear's base Linear: named as the plain model names it
        if owner in layers:
            key = f"{owner}.{rest}"
        t = t.detach().contiguous().cpu()
        digest.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def fit_info(deploy, routing: str, ops: str) -> dict:
    """What the graph's metadata records and what an adapter must match: tensors, base hash, Lily settings."""
    lily = (deploy.meta or {}).get("lily") or {}
    sha = base_sha256(deploy)
    return {
        "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for n, (_, t) in adapter_tensors(deploy).items()},
        "base_sha256": sha,
        "base_tag": base_tag(sha),
        "base_model": (deploy.meta or {}).get("base_model"),
        "scaling": float(lily.get("scaling") or 1.0),
        "routing": routing,
        "ops": ops,
        "format": "onnxruntime adapter (AdapterFormat), activated per run through RunOptions.add_active_adapter",
    }


# ---------------------------------------------------------------------------------------
# export: the adapter tensors as graph inputs with defaults
# ---------------------------------------------------------------------------------------

class _SwitchableWrapper(nn.Module):
    """The export wrapper with the adapter tensors as trailing inputs, swapped in by ``functional_call``."""

    def __init__(self, inner: nn.Module, n_inputs: int, paths: list[str]):
        super().__init__()
        self.inner = inner
        self.n_inputs = n_inputs
        self.paths = paths

    def forward(self, *args):
        params = {"deploy.model." + p: t for p, t in zip(self.paths, args[self.n_inputs:])}
        return torch.func.functional_call(self.inner, params, args[: self.n_inputs])


def switchable_graph(deploy, inputs: dict, dynamic, opset: int, ops: str, routing: str):
    """``(ModelProto, metadata)``: the traced graph whose adapter tensors are inputs with defaults."""
    from .converters.hpmix import attach_function_bodies, inline_bodies, onnx_translation
    from .onnx_export import OUTPUT_NAME, _dynamic_shapes, _ExportWrapper

    tensors = adapter_tensors(deploy)
    names = list(inputs)
    wrapper = _SwitchableWrapper(_ExportWrapper(deploy, names), len(names), [p for p, _ in tensors.values()]).eval()
    args = tuple(inputs[n] for n in names) + tuple(t.detach().clone() for _, t in tensors.values())
    shapes = (tuple(_dynamic_shapes(names, dynamic)) + tuple({} for _ in tensors),)
    deploy.context.use_custom_op = True
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                        input_names=names + list(tensors), output_names=[OUTPUT_NAME],
                                        dynamic_shapes=shapes, custom_translation_table=onnx_translation(),
                                        optimize=True, verbose=False)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:300]
        raise LilyDeployError(f"switchable ONNX export failed: {first}") from None
    finally:
        deploy.context.use_custom_op = False
    model = program.model_proto
    layer = next(iter(deploy.layers.values()))
    attach_function_bodies(model, rank=layer.rank, num_hp=layer.num_hp)
    if ops == "standard":
        model = inline_bodies(model)
    _add_defaults(model, tensors)
    return model, {ADAPTER_META: fit_info(deploy, routing, ops)}


def _add_defaults(model, tensors: dict) -> None:
    """Each adapter input gets an initializer of the same name: the exported adapter's values."""
    from onnx import numpy_helper

    graph_inputs = {i.name for i in model.graph.input}
    missing = [n for n in tensors if n not in graph_inputs]
    if missing:  # the exporter dropped an input that the graph does not use
        raise LilyDeployError(f"switchable export: adapter tensor {missing[0]} is not used by the traced graph")
    taken = {t.name for t in model.graph.initializer}
    for name, (_, t) in tensors.items():
        if name not in taken:
            model.graph.initializer.append(numpy_helper.from_array(t.detach().cpu().numpy(), name))


def engine_graph(model) -> tuple[object, int]:
    """For TensorRT: the graph with the adapter inputs' defaults dropped (engine inputs), and how many."""
    from .runtime.onnx_io import metadata, metadata_value

    info = metadata_value(metadata(model), ADAPTER_META)
    if not isinstance(info, dict):
        return model, 0
    names = set(info.get("tensors") or {})
    keep = [t for t in model.graph.initializer if t.name not in names]
    dropped = len(model.graph.initializer) - len(keep)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model, dropped


# ---------------------------------------------------------------------------------------
# pack: an adapter as an ONNX Runtime adapter file for a switchable graph
# ---------------------------------------------------------------------------------------

@dataclass
class PackResult:
    path: Path
    tensors: int
    bytes: int
    head: bool
    notes: list


def pack_adapter(config: Optional[PackConfig] = None, /, **fields) -> PackResult:
    """Check that ``adapter`` fits ``graph`` and write its tensors as an ONNX Runtime adapter file."""
    from .core.deploy import open_model
    from .core.fileio import check_not_input, check_output_parent
    from .runtime.onnx_io import load_onnx, metadata, metadata_value

    config = PackConfig.resolve(config, **fields)
    output = check_output_parent(config.output, "-o")
    check_not_input(output, {"adapter": config.adapter, "graph": config.graph}, "-o")
    info = metadata_value(metadata(load_onnx(config.graph, flag="--for")), ADAPTER_META)
    if not isinstance(info, dict):
        raise LilyDeployError(f"--for {config.graph}: not a switchable graph (export it with --switchable)")
    deploy = open_model(config.adapter, base=config.base)
    check_switchable(deploy, config.adapter)
    deploy.eval()
    arrays, notes = _adapter_arrays(deploy, info)
    check_adapter_fit({n: list(a.shape) for n, a in arrays.items()}, info, base_tag(base_sha256(deploy)),
                      f"adapter {config.adapter}", f"--for {config.graph}")
    size = _write_adapter(output, arrays, info["base_tag"])
    head = any(n.startswith(ADAPTER_PREFIX + "head.") for n in arrays)
    return PackResult(output, len(arrays), size, head, notes)


def _adapter_arrays(deploy, info: dict) -> tuple[dict, list[str]]:
    """The adapter's tensors as float32 arrays; an HP pool rescaled when its scaling differs from the graph's."""
    lily = (deploy.meta or {}).get("lily") or {}
    mine, graph = float(lily.get("scaling") or 1.0), float(info.get("scaling") or 1.0)
    notes = []
    arrays = {}
    for name, (_, t) in adapter_tensors(deploy).items():
        a = t.detach().float().cpu()
        if name.startswith(ADAPTER_PREFIX + "hp.") and mine != graph:
            a = a * (mine / graph)  # s * h B~ is linear in the HPs: the graph's scale times rescaled HPs
        arrays[name] = a.numpy()
    if mine != graph:
        notes.append(f"the adapter's scaling {mine:g} differs from the graph's {graph:g}: its HP pools are "
                     f"stored times {mine / graph:g}, which gives the same update")
    return arrays, notes


def _write_adapter(output: Path, arrays: dict, tag: int) -> int:
    """Write ``arrays`` in onnxruntime's adapter format, atomically; the file's size."""
    import numpy as np
    import onnxruntime as ort

    from .core.fileio import atomic_file

    af = ort.AdapterFormat()
    af.set_adapter_version(1)
    af.set_model_version(int(tag))
    held = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in arrays.items()}  # OrtValues view these
    af.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in held.items()})
    with atomic_file(output) as tmp:
        af.export_adapter(str(Path(tmp).resolve()))
    return output.stat().st_size
