"""``export``: a Lily model leaves as an ONNX file any runtime can run.

Each dynamic layer's HP mixing becomes one ``lily::HPMix`` node carrying a model-local
FunctionProto body (``ops="custom"``), or that body inlined (``ops="standard"``). The LP and
router stay plain MatMuls so quantizers see them; static layers are folded into their base
weight first, so they export as plain MatMul/Gemm. Every export is validated against torch
on onnxruntime before the file is put in place.
"""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .converters.hpmix import attach_function_bodies, hpmix_nodes, inline_bodies, onnx_translation
from .core.config import ConfigError, StageConfig, check_choice, check_number
from .core.deploy import open_model
from .core.errors import LilyDeployError
from .core.fileio import check_not_input, check_output_parent, sha256_dir
from .core.models import TASKS
from .core.modes import DYNAMIC_MODES, STATE_MODES

EXPORT_MODES = DYNAMIC_MODES + STATE_MODES  # static layers are folded, not routed
from .runtime.decoder import single_routing
from .runtime.onnx_io import set_metadata, staged_onnx

logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

MIN_OPSET = 18  # ReduceMean/ReduceSum take axes as an input from opset 18 on
DEFAULT_OPSET = 20
OUTPUT_NAME = "logits"
PER_TOKEN_TASKS = ("token-cls", "qa")  # outputs per token: padding positions are not compared
DEFAULT_ATOL = 1e-4
OPS = ("custom", "standard")
AXES = ("batch", "sequence")
VALIDATION_TEXTS = [
    "a gripping, beautifully acted film that stays with you",
    "dull",
    "the plot never quite comes together, and the jokes fall flat more often than not",
    "an instant classic",
    "i wanted to like it , but the second half drags",
    "not bad at all",
    "one of the year 's most intriguing explorations of alienation",
    "it 's a mess",
]


@dataclass(frozen=True)
class ExportConfig(StageConfig):
    """What :func:`export_onnx` exports and how it is checked; the fields are its keyword parameters.

    ``source`` is an adapter folder, a deploy checkpoint or a base model name. ``routing`` is
    the dynamic layers' routing; ``ops`` "custom" keeps ``lily::HPMix`` nodes with function
    bodies, "standard" inlines them. ``dynamic`` lists the input axes left dynamic (a comma
    string is split). ``validation`` compares onnxruntime against torch before the file is put in
    place, within ``atol`` per output name ("*": every output); it runs on ``inputs_npz``, or
    on texts of ``data``, or on built-in texts. ``task``, when given, must be the model's.
    """

    source: str | Path
    output: str | Path
    routing: Optional[str] = None  # encoders: sample; decoders: the routing the adapter was trained with
    ops: str = "custom"
    opset: int = DEFAULT_OPSET
    dynamic: Sequence[str] = AXES
    external_data: bool = False
    task: Optional[str] = None
    validation: bool = True
    atol: Mapping[str, float] = field(default_factory=dict)
    data: Optional[str | Path] = None
    inputs_npz: Optional[str | Path] = None
    keep_on_failure: bool = False
    base: Optional[str] = None
    text_column: Optional[str] = None
    cache: bool = True  # decoders: KV cache and routing state as inputs/outputs (False: a plain logits graph)
    allow_inconsistent_routing: bool = False  # decoders: export batch/sample routing under a cache anyway
    switchable: bool = False  # adapter tensors as graph inputs with defaults (lily_deploy.switchable)
    optimize: str = "none"  # "onnxruntime": fused Attention/SkipLayerNorm/BiasGelu (lily_deploy.graph_optimize)

    def __post_init__(self) -> None:
        dynamic = self.dynamic.split(",") if isinstance(self.dynamic, str) else (self.dynamic or ())
        object.__setattr__(self, "dynamic", tuple(a.strip() for a in dynamic if a.strip()))
        object.__setattr__(self, "atol", dict(self.atol or {}))
        super().__post_init__()

    def validate(self) -> None:
        check_choice("routing", self.routing, EXPORT_MODES, allow_none=True)
        check_choice("ops", self.ops, OPS)
        check_number("opset", self.opset, integer=True)
        if self.opset < MIN_OPSET:
            raise ConfigError("opset", f"{self.opset}: the lily::HPMix bodies need opset {MIN_OPSET} or newer")
        bad_axes = [a for a in self.dynamic if a not in AXES]
        if bad_axes:
            raise ConfigError("dynamic", f"{bad_axes[0]!r}: axes are {' and '.join(AXES)}")
        check_choice("task", self.task, TASKS, allow_none=True)
        check_choice("optimize", self.optimize, ("none", "onnxruntime"))
        if self.optimize != "none" and (self.ops != "custom" or self.switchable):
            raise ConfigError("optimize", f"{self.optimize} needs --ops custom and no --switchable (the fuser "
                                          "finds the Lily terms by their lily::HPMix nodes)")
        for tol in self.atol.values():
            check_number("atol", tol, minimum=0)


@dataclass
class Comparison:
    """One output compared between onnxruntime and torch for one input batch; truthy when it passes."""

    output: str
    batch: str
    max_abs: float
    max_rel: float
    top1_agreement: float
    atol: float

    def __bool__(self) -> bool:
        return self.max_abs <= self.atol

    def row(self) -> str:
        status = "ok" if self else "FAILED"
        return (f"  {self.output:<12} {self.batch:<14} max_abs {self.max_abs:.3e}  max_rel {self.max_rel:.3e}  "
                f"top1 {100 * self.top1_agreement:6.2f}%  atol {self.atol:.0e}  {status}")


@dataclass
class ExportResult:
    path: Path
    routing: str
    ops: str
    dynamic_layers: int
    folded_layers: int
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tokens_match: bool = True  # decoders: greedy tokens on onnxruntime == torch
    tokens_checked: str = ""  # decoders: what was generated to compare tokens

    @property
    def passed(self) -> bool:
        return all(self.comparisons) and self.tokens_match

    def table(self) -> str:
        lines = [f"validation: onnxruntime vs torch ({'PASSED' if self.passed else 'FAILED'})"]
        lines += [c.row() for c in self.comparisons]
        if self.tokens_checked:
            lines.append(f"  greedy tokens: {'identical to torch' if self.tokens_match else 'DIFFER from torch'} "
                         f"({self.tokens_checked})")
        return "\n".join(lines)


class _ExportWrapper(nn.Module):
    """Positional inputs with stable names -> logits, setting the routing mask like LilyDeployModel."""

    def __init__(self, deploy, input_names: Sequence[str]):
        super().__init__()
        self.deploy = deploy
        self.input_names = list(input_names)

    def forward(self, *args):
        inputs = dict(zip(self.input_names, args))
        if self.deploy.output_names == [OUTPUT_NAME]:
            return self.deploy.logits(**inputs)
        return tuple(self.deploy.outputs(**inputs).values())  # extractive QA: start_logits, end_logits


def _wrapper_dynamic_shapes(names, dynamic):
    """``dynamic_shapes`` for the wrapper's ``*args``: one tuple holding each input's axes."""
    return (_dynamic_shapes(names, dynamic),)


def fold_static_layers(deploy) -> int:
    """Replace every ``static`` LilyLinear by a plain Linear with the folded weight (in place)."""
    from .core.peft_bridge import set_module

    n = 0
    for name, layer in list(deploy.layers.items()):
        if layer.mode == "static":
            set_module(deploy.model, name, layer.folded_linear())
            deploy.folded[name] = layer.static_p.tolist()
            n += 1
    return n


def example_inputs(deploy, texts: Optional[Sequence[str]] = None, batch_size: int = 2,
                   max_length: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real model inputs: tokenised texts (padded to the longest), or seeded random pixels."""
    if deploy.task == "image-cls":
        g = torch.Generator().manual_seed(seed)
        size = deploy.image_size or 224
        return {"pixel_values": torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1}
    if deploy.tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        vocab = int(getattr(deploy.model.config, "vocab_size", 1000))
        ids = torch.randint(5, vocab, (batch_size, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    texts = list(texts or VALIDATION_TEXTS)
    texts = (texts * ((batch_size + len(texts) - 1) // len(texts)))[:batch_size]
    enc = deploy.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in deploy.input_names}


def _dynamic_shapes(names: Sequence[str], dynamic: Sequence[str]):
    dims = {"batch": torch.export.Dim("batch", min=1, max=4096), "sequence": torch.export.Dim("sequence", min=1, max=8192)}
    shapes = []
    for name in names:
        axes = {}
        if "batch" in dynamic:
            axes[0] = dims["batch"]
        if "sequence" in dynamic and name != "pixel_values":
            axes[1] = dims["sequence"]
        shapes.append(axes)
    return tuple(shapes)


def _trace(deploy, inputs: dict, dynamic: Sequence[str], opset: int, ops: str):
    names = list(inputs)
    wrapper = _ExportWrapper(deploy, names).eval()
    args = tuple(inputs[n] for n in names)
    deploy.context.use_custom_op = True
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=opset, input_names=names, output_names=deploy.output_names,
                dynamic_shapes=_wrapper_dynamic_shapes(names, dynamic), custom_translation_table=onnx_translation(),
                optimize=True, verbose=False,
            )
    except Exception as exc:  # the exporter's errors are long; keep the line that names the op
        detail = [l for l in str(exc).splitlines() if "Error" in l or "not supported" in l or "call_function" in l]
        raise LilyDeployError(
            f"ONNX export failed: {(detail[-1] if detail else str(exc).splitlines()[0]).strip()[:400]}"
        ) from None
    finally:
        deploy.context.use_custom_op = False
    model = program.model_proto
    layers = list(deploy.layers.values())
    if layers:
        attach_function_bodies(model, rank=layers[0].rank, num_hp=layers[0].num_hp)
    if ops == "standard":
        model = inline_bodies(model)
    return model


def source_hashes(source: str | Path, deploy) -> dict:
    path = Path(str(source))
    out = {}
    if path.is_dir():
        out["source_sha256"] = sha256_dir(path)
    adapter = (deploy.meta or {}).get("adapter")
    if adapter:
        out["adapter_sha256"] = adapter.get("sha256")
    return out


def read_inputs_npz(path: str | Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Validation inputs given as an ``.npz`` with one array per model input."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise LilyDeployError(f"validation inputs file {path} does not exist")
    try:
        arrays = dict(np.load(path))
    except Exception as exc:
        raise LilyDeployError(f"{path}: not a readable .npz ({exc})") from None
    missing = [n for n in names if n not in arrays and n != "token_type_ids"]
    if missing:
        raise LilyDeployError(f"{path}: no array for model input {missing[0]} (has {', '.join(arrays)})")
    return {n: torch.from_numpy(arrays[n]) for n in names if n in arrays}


def check_input_shapes(deploy, inputs: dict, where: str) -> None:
    """Refuse validation inputs whose rank or feature sizes cannot feed the model."""
    if deploy.task == "image-cls":
        x = inputs.get("pixel_values")
        size = deploy.image_size or 224
        if x is None or x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise LilyDeployError(f"{where}: pixel_values must be [N, 3, {size}, {size}], got "
                                  f"{list(x.shape) if x is not None else 'nothing'}")
        return
    ref = inputs.get("input_ids")
    if ref is None or ref.dim() != 2:
        raise LilyDeployError(f"{where}: input_ids must be [batch, sequence], got {list(ref.shape) if ref is not None else 'nothing'}")
    for name, t in inputs.items():
        if tuple(t.shape) != tuple(ref.shape):
            raise LilyDeployError(f"{where}: {name} has shape {list(t.shape)}, input_ids has {list(ref.shape)}")
        if t.dtype.is_floating_point:
            raise LilyDeployError(f"{where}: {name} must hold integers, got {t.dtype}")
    _check_id_ranges(deploy, inputs, where)


def _check_id_ranges(deploy, inputs: dict, where: str) -> None:
    """Token ids (and token types) the model can embed: an id past its vocabulary is the file's fault."""
    cfg = getattr(deploy.model, "config", None)
    limits = {"input_ids": getattr(cfg, "vocab_size", None), "token_type_ids": getattr(cfg, "type_vocab_size", None),
              "attention_mask": 2}
    for name, limit in limits.items():
        t = inputs.get(name)
        if t is None or not t.numel() or not limit:
            continue
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            raise LilyDeployError(f"{where}: {name} holds {bad}, outside the model's range 0..{limit - 1}")


def compare(deploy, onnx_path: Path, batches: list[tuple[str, dict]], atol: dict[str, float]) -> list[Comparison]:
    """Run the ONNX on onnxruntime and the model in torch on the same batches; compare every output.

    Per-token outputs (token classification, QA) are compared on the real tokens only (padding
    positions are excluded); the agreement is per token for token classification and the span
    exact match (start and end both the same) for QA.
    """
    import numpy as np

    from .runtime.ort import OrtRunner

    candidate = OrtRunner(onnx_path)
    missing = [n for n in candidate.input_names if all(n not in inputs for _, inputs in batches)]
    if missing:
        raise LilyDeployError(f"validation inputs lack {missing[0]}, which the ONNX model needs")
    names = deploy.output_names
    absent = [n for n in names if n not in candidate.output_names]
    if absent:
        raise LilyDeployError(f"{onnx_path}: the graph has no output {absent[0]} (has {', '.join(candidate.output_names)})")
    results = []
    for label, inputs in batches:
        with torch.no_grad():
            refs = {k: v.float().numpy() for k, v in deploy.outputs(**inputs).items()}
        gots = candidate.infer(inputs, names)
        keep = _real_tokens(deploy, inputs, refs[names[0]])
        agree = _agreement(deploy.task, gots, refs, keep)
        for name in names:
            got, ref = _real(gots[name], keep), _real(refs[name], keep)
            diff = np.abs(got - ref)
            rel = diff / np.maximum(np.abs(ref), 1e-6)
            results.append(Comparison(name, label, float(diff.max(initial=0.0)), float(rel.max(initial=0.0)), agree,
                                      atol.get(name, atol.get("*", DEFAULT_ATOL))))
    return results


def _real_tokens(deploy, inputs: dict, ref):
    """``[batch, sequence]`` booleans of the real (non-padding) tokens for a per-token output, else None."""
    import numpy as np

    mask = inputs.get("attention_mask")
    if deploy.task not in PER_TOKEN_TASKS or mask is None or ref.ndim < 2:
        return None
    return np.asarray(mask).astype(bool)


def _real(values, keep):
    """A per-token output at the real tokens only (``[tokens, ...]``); any other output as it is."""
    return values if keep is None else values[keep]


def _agreement(task: str, gots: dict, refs: dict, keep) -> float:
    """Top-1 agreement on the task's own prediction: class, class per real token, or QA's (start, end) span."""
    import numpy as np

    if task == "qa":
        spans = []
        for out in (gots, refs):
            start, end = (np.where(keep, out[n], -np.inf) if keep is not None else out[n]
                          for n in ("start_logits", "end_logits"))
            spans.append(np.stack([start.argmax(-1), end.argmax(-1)], -1))
        return float((spans[0] == spans[1]).all(-1).mean())
    got, ref = _real(gots[OUTPUT_NAME], keep), _real(refs[OUTPUT_NAME], keep)
    return float((got.reshape(-1, got.shape[-1]).argmax(-1) == ref.reshape(-1, ref.shape[-1]).argmax(-1)).mean())


def export_onnx(config: Optional[ExportConfig] = None, /, **fields) -> ExportResult:
    """Export ``source`` (adapter folder, deploy checkpoint or base model) to ``output``.

    The fields are :class:`ExportConfig`'s. Raises :class:`LilyDeployError` when validation
    fails (the file is then written only with ``keep_on_failure``); the result carries the
    comparison table either way.
    """
    config = ExportConfig.resolve(config, **fields)
    output = _check_paths(config)
    deploy, notes, routing, trained = _prepare_model(config)
    if config.switchable:  # folded layers and decoders cannot switch: one line, before any tracing
        from .switchable import check_switchable

        check_switchable(deploy, config.source)
    if deploy.task == "causal-lm" and config.cache:
        if config.optimize != "none":
            raise ConfigError("optimize", f"{config.optimize} is for encoders; a decoder with its cache exports unfused")
        return _export_decoder(config, deploy, notes, routing, output)
    validation_batches = _validation_batches(config, deploy)
    if config.validation and trained in DYNAMIC_MODES and routing in DYNAMIC_MODES:
        drift = routing_drift(deploy, trained, routing, validation_batches)
        if drift:
            notes.append(drift)
    trace_inputs = example_inputs(deploy, None, batch_size=2, seed=0)
    model = _build_graph(config, deploy, trace_inputs, routing)

    result = ExportResult(output, routing, config.ops, len(deploy.layers), len(deploy.folded), notes=notes)
    if config.optimize != "none":  # fused for onnxruntime, then validated like every export
        from .graph_optimize import optimize_graph

        model, fused_note = optimize_graph(model, config.optimize, str(config.source))
        result.notes.append(fused_note)
    with staged_onnx(output) as staged:
        staged.write(model, config.external_data)
        if config.validation:
            result.comparisons = compare(deploy, staged.path, validation_batches, dict(config.atol))
        if result.passed or config.keep_on_failure:
            staged.commit()
    return result


def _export_decoder(config: ExportConfig, deploy, notes: list, routing: str, output: Path) -> ExportResult:
    """A decoder with its KV cache and routing state, validated by greedy generation against torch."""
    import onnx

    from .decoder_export import decoder_metadata, trace_decoder, validate_decoder

    model = trace_decoder(deploy, config.opset, config.ops)
    meta = _metadata(config, deploy, {}, routing)
    meta.update(decoder_metadata(deploy))
    meta["lily_deploy.inputs"] = [i.name for i in model.graph.input]
    set_metadata(model, meta)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise LilyDeployError(f"exported decoder graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    result = ExportResult(output, routing, config.ops, len(deploy.layers), len(deploy.folded), notes=notes)
    with staged_onnx(output) as staged:
        staged.write(model, config.external_data)
        if config.validation:
            atol = dict(config.atol).get(OUTPUT_NAME, dict(config.atol).get("*", DEFAULT_ATOL))
            result.comparisons, token_notes, result.tokens_checked = validate_decoder(deploy, staged.path, atol)
            result.notes.extend(token_notes)
            result.tokens_match = not token_notes
        if result.passed or config.keep_on_failure:
            staged.commit()
    return result


def resolve_routing(config: ExportConfig, deploy) -> str:
    """The routing to export: the config's, or (encoders) sample, or (decoders) the routing it was trained with."""
    from .runtime.decoder import check_cache_consistent

    if deploy.task != "causal-lm":
        routing = config.routing or "sample"
        if routing not in DYNAMIC_MODES:
            raise ConfigError("routing", f"{routing} routing is for decoders; an encoder routes by "
                                         f"{', '.join(DYNAMIC_MODES)}")
        return routing
    routing = config.routing or single_routing(deploy) or "prompt"
    if config.cache:
        check_cache_consistent({routing}, str(config.source), config.allow_inconsistent_routing)
    return routing


def _check_paths(config: ExportConfig) -> Path:
    """Refuse, before loading anything, an output that cannot be written or would overwrite an input."""
    output = check_output_parent(config.output, "-o")
    inputs = {"model": config.source, "base model": config.base, "validation inputs": config.inputs_npz,
              "validation data": config.data}
    check_not_input(output, inputs, "-o")
    if config.external_data:  # the weights go beside the graph: that file must not be an input either
        check_not_input(output.with_name(output.name + ".data"), inputs, "-o")
    return output


def routing_drift(deploy, trained: str, routing: str, batches: list[tuple[str, dict]]) -> Optional[str]:
    """Deployed with another routing than trained: how far torch's logits move on the validation batches.

    Measured, not assumed: the same model and inputs under the trained and the deployed routing;
    returns one line for the user (None when there is nothing to compare).
    """
    from .runtime.torch_runner import routing_drift as measure_drift

    if not batches or trained == routing:
        return None
    moved, kept = measure_drift(deploy, [inputs for _, inputs in batches], trained, routing)
    rows = sum(len(next(iter(inputs.values()))) for _, inputs in batches)
    return (f"trained with {trained} routing, exported with {routing}: on the {rows} validation rows the logits "
            f"move by up to {moved:.3g} and {kept:.1%} keep their top-1 class (torch, {trained} vs "
            f"{routing}); --routing {trained} deploys what was trained")


def _prepare_model(config: ExportConfig):
    """The model as it will be exported (routing set, static layers folded), what to tell the user, the
    routing set and the routing it was trained with (None when its layers do not share one)."""
    deploy = open_model(config.source, base=config.base)
    if deploy.task == "seq2seq":
        kind = getattr(getattr(deploy.model, "config", None), "model_type", "encoder-decoder")
        raise LilyDeployError(f"{config.source}: a seq2seq ({kind}) model; export supports encoders and decoders, "
                              "not encoder-decoders yet (inspect reads it)")
    if config.task is not None and config.task != deploy.task:
        raise ConfigError("task", f"{config.task}: the model is a {deploy.task} model")
    deploy = copy.deepcopy(deploy) if deploy.layers else deploy
    trained = single_routing(deploy)  # as loaded: the adapter's own, before export routes it
    routing = resolve_routing(config, deploy)
    if deploy.layers:
        deploy.set_routing(routing)
    else:  # nothing routes: say so rather than name a default that applies to nothing
        routing = "none"
    notes = []
    fold_static_layers(deploy)
    if not deploy.layers and not deploy.folded:
        notes.append("the model has no Lily layers: exported as a plain model")
        if deploy.meta.get("new_modules"):  # a backbone with a task head it lacks: random, for latency only
            notes.append(f"its {', '.join(deploy.meta['new_modules'])} is not in {config.source} and was initialised "
                         "at random: outputs are for latency and graph checks, not predictions")
    elif not deploy.layers:
        notes.append("every Lily layer is folded: exported as a plain model (no lily::HPMix nodes)")
    deploy.eval()
    return deploy, notes, routing, trained


def _validation_batches(config: ExportConfig, deploy) -> list[tuple[str, dict]]:
    """The batches torch and onnxruntime are compared on: the given inputs, or texts at batch 1 and 4."""
    if config.inputs_npz is not None:
        given = read_inputs_npz(config.inputs_npz, deploy.input_names)
        check_input_shapes(deploy, given, str(config.inputs_npz))
        return [(f"given[{next(iter(given.values())).shape[0]}]", given)]
    texts = None
    if config.data is not None:
        from .core.data import read_data

        table = read_data(config.data, text_column=config.text_column, limit=64)
        texts = table.texts if hasattr(table, "texts") else None
    return [(f"batch {bs}", example_inputs(deploy, texts, batch_size=bs, seed=bs)) for bs in (1, 4)]


def _build_graph(config: ExportConfig, deploy, trace_inputs: dict, routing: str):
    """The traced graph with its provenance metadata, checked by onnx.checker and for one HPMix per layer."""
    import onnx

    extra = {}
    if config.switchable:  # the adapter tensors as named inputs with defaults, listed in the metadata
        from .switchable import switchable_graph

        model, extra = switchable_graph(deploy, trace_inputs, config.dynamic, config.opset, config.ops, routing)
    else:
        model = _trace(deploy, trace_inputs, config.dynamic, config.opset, config.ops)
    set_metadata(model, {**_metadata(config, deploy, trace_inputs, routing), **extra})
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise LilyDeployError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    n_dynamic = len(deploy.layers)
    if config.ops == "custom" and n_dynamic:
        calls = count_layer_calls(deploy, trace_inputs)
        if len(hpmix_nodes(model)) != calls:
            shared = f" ({calls} calls of {n_dynamic} dynamic layers)" if calls != n_dynamic else ""
            raise LilyDeployError(f"expected {calls} lily::HPMix nodes{shared}, the graph has {len(hpmix_nodes(model))}")
    return model


def count_layer_calls(deploy, inputs: dict) -> int:
    """How many times one forward calls a dynamic Lily layer: one ``lily::HPMix`` node each.

    A layer whose weights are shared across depth (ALBERT: one layer run by every layer) is
    called several times; a layer the forward never reaches is not counted.
    """
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1

    handles = [layer.register_forward_hook(hook) for layer in deploy.layers.values()]
    try:
        with torch.no_grad():
            deploy(**inputs)
    finally:
        for h in handles:
            h.remove()
    return calls[0]


def _metadata(config: ExportConfig, deploy, trace_inputs: dict, routing: str) -> dict:
    """What later stages (quantize, build-trt, parity) read back from the graph: routing, task, labels, hashes."""
    n_dynamic = len(deploy.layers)
    return {
        "lily_deploy.version": __import__("lily_deploy").__version__,
        "lily_deploy.routing": routing if n_dynamic else "none",
        "lily_deploy.ops": config.ops,
        "lily_deploy.task": deploy.task,
        "lily_deploy.inputs": list(trace_inputs),
        "lily_deploy.outputs": deploy.output_names,
        "lily_deploy.labels": deploy.labels,
        "lily_deploy.base_model": deploy.meta.get("base_model"),
        "lily_deploy.fold": {"dynamic_layers": n_dynamic, "folded_layers": len(deploy.folded),
                             "folded": sorted(deploy.folded)},
        "lily_deploy.lily": deploy.meta.get("lily"),
        **{f"lily_deploy.{k}": v for k, v in source_hashes(config.source, deploy).items()},
    }
