"""The deploy model and its checkpoint format.

A deploy checkpoint is a folder: ``model.safetensors`` (all weights, shared tensors once),
``deploy_config.json`` (routing modes, static vectors, folded layers, LP groups and HP pools,
provenance: base model and adapter hash), and the base's ``config.json`` and tokenizer files.
``load_model`` opens either that or a PEFT-Lily adapter folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import schema
from .errors import LilyDeployError
from .lily import HPPool, LilyLinear, RoutingContext, check_mode, lily_layers, set_routing

DEPLOY_CONFIG = "deploy_config.json"
WEIGHTS = "model.safetensors"
FORMAT = "lily-deploy/1"
# outputs per task (every other task: "logits")
TASK_OUTPUTS = {"qa": ("start_logits", "end_logits")}
LILY_CONFIG_KEYS = ("r", "stride_A", "num_B", "scaling", "target_modules", "modules_to_save", "task_type")


def version() -> str:
    from . import __version__

    return __version__


class LilyDeployModel(nn.Module):
    """A base model whose adapted Linears are ``LilyLinear``; sets the routing mask per call.

    ``folded`` maps each layer folded into its base weight to the mixing vector used.
    ``meta`` is the provenance and Lily config written to ``deploy_config.json``.
    """

    def __init__(self, model: nn.Module, context: RoutingContext, task: str, layer_specs: dict,
                 meta: dict, tokenizer: Any = None, folded: Optional[dict] = None, image_size: Optional[int] = None):
        super().__init__()
        self.model = model
        self.context = context
        self.task = task
        self.layer_specs = layer_specs
        self.meta = meta
        self.tokenizer = tokenizer
        self.folded = dict(folded or {})
        self.image_size = image_size
        for name, layer in lily_layers(model).items():
            layer.state_key = name  # the key of its routing state (prompt/causal)

    @property
    def layers(self) -> dict[str, LilyLinear]:
        return lily_layers(self.model)

    @property
    def labels(self) -> Optional[list[str]]:
        return self.meta.get("labels")

    @property
    def input_names(self) -> list[str]:
        if self.task == "image-cls":
            return ["pixel_values"]
        import inspect

        names = ["input_ids", "attention_mask"]
        takes = inspect.signature(self.model.forward).parameters
        if self.tokenizer is not None and "token_type_ids" in self.tokenizer.model_input_names \
                and "token_type_ids" in takes:  # a Llama with a BERT tokenizer takes no token types
            names.append("token_type_ids")
        return names

    def forward(self, *args, **inputs):
        self.context.mask = inputs.get("attention_mask")
        try:
            return self.model(*args, **inputs)
        finally:
            self.context.mask = None

    @property
    def output_names(self) -> list[str]:
        """The task's outputs: ``logits`` (``[batch, classes]``, per token ``[batch, sequence, classes]``), or
        extractive QA's ``start_logits`` and ``end_logits`` (``[batch, sequence]``)."""
        return list(TASK_OUTPUTS.get(self.task, ("logits",)))

    def outputs(self, **inputs) -> dict[str, torch.Tensor]:
        """Every output of :attr:`output_names`, by name."""
        out = self(**inputs)
        if isinstance(out, torch.Tensor):
            return {"logits": out}
        return {name: getattr(out, name) for name in self.output_names}

    def logits(self, **inputs) -> torch.Tensor:
        """The ``logits`` output; for QA start and end stacked on a last axis, ``[batch, sequence, 2]``."""
        out = self(**inputs)
        if isinstance(out, torch.Tensor):
            return out
        if self.task == "qa":
            return torch.stack([out.start_logits, out.end_logits], dim=-1)
        return out.logits

    def set_routing(self, mode: str) -> None:
        """Route every dynamic layer by ``mode``; static layers keep their frozen vector."""
        set_routing(self.model, mode)


def from_peft(peft_model: Any, base, info=None, mode: str = "batch") -> LilyDeployModel:
    """Deploy model from a loaded PEFT-Lily model (see ``converters.peft_lily``)."""
    from .peft_bridge import peft_to_deploy

    check_mode(mode)
    config = peft_model.peft_config[peft_model.active_adapter]
    lily = {k: getattr(config, k) for k in LILY_CONFIG_KEYS}
    for key in ("target_modules", "modules_to_save"):
        if isinstance(lily[key], (set, tuple)):
            lily[key] = sorted(set(lily[key]))
    if lily["task_type"] is not None:
        lily["task_type"] = str(getattr(lily["task_type"], "value", lily["task_type"]))
    model, context, specs = peft_to_deploy(peft_model, mode=mode)
    labels = info.labels if info is not None else None
    if labels is None and base.task in ("seq-cls", "image-cls", "token-cls"):
        id2label = getattr(getattr(model, "config", None), "id2label", None)
        if id2label:
            labels = [str(id2label[i]) for i in sorted(id2label)]
    meta = {
        "base_model": base.spec,
        "base_kind": base.kind,
        "adapter": {"path": str(info.path), "sha256": info.sha256()} if info is not None else None,
        "lily": lily,
        "labels": labels,
    }
    return LilyDeployModel(model, context, base.task, specs, meta, tokenizer=base.tokenizer,
                           image_size=base.image_size)


def load_model(path: str | Path, base: Optional[str] = None, mode: Optional[str] = None) -> LilyDeployModel:
    """Open a PEFT-Lily adapter folder or a deploy checkpoint as a ``LilyDeployModel``.

    ``mode`` sets the routing of every dynamic layer (an adapter defaults to ``batch``,
    PEFT's own semantics; a checkpoint keeps the modes it was saved with).
    """
    from .adapters import is_adapter_dir, load_adapter

    path = Path(path)
    if (path / DEPLOY_CONFIG).is_file():
        model = load_deploy(path)
    elif is_adapter_dir(path):
        peft_model, base_model, info = load_adapter(path, base=base)
        # an adapter trained with `finetune --routing sample` deploys with the routing it learned
        model = from_peft(peft_model, base_model, info, mode=info.sidecar.get("routing") or "batch")
    elif not path.exists():
        raise LilyDeployError(f"{path} does not exist")
    else:
        raise LilyDeployError(f"{path} is neither a PEFT adapter folder nor a lily-deploy checkpoint")
    if mode is not None:
        model.set_routing(mode)
    model.eval()
    return model


def save_deploy(model: LilyDeployModel, out: str | Path, extra: Optional[dict] = None) -> Path:
    """Write a deploy checkpoint atomically (a failure leaves any previous ``out`` intact)."""
    from safetensors.torch import save_model

    from .fileio import atomic_dir

    layers = model.layers
    config = {
        "format": FORMAT,
        "lily_deploy_version": version(),
        "task": model.task,
        **model.meta,
        "layers": {
            name: {**model.layer_specs[name], "mode": layer.mode,
                   "static_p": layer.static_p.tolist() if layer.mode == "static" else None}
            for name, layer in layers.items()
        },
        "folded": model.folded,
        "image_size": model.image_size,
    }
    if extra:
        config.update(extra)
    with atomic_dir(out) as tmp:
        if hasattr(model.model, "config") and hasattr(model.model.config, "save_pretrained"):
            model.model.config.save_pretrained(tmp)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        save_model(model.model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / DEPLOY_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)


def _build_architecture(path: Path, config: dict) -> tuple[nn.Module, Any]:
    task = config["task"]
    if config.get("base_kind") == "timm":
        try:
            import timm
        except ImportError:
            raise LilyDeployError(f"{path}: a timm checkpoint needs timm: pip install 'lily-deploy[timm]'") from None
        name = config["base_model"].removeprefix("timm:")
        n = len(config["labels"]) if config.get("labels") else None
        return timm.create_model(name, pretrained=False, **({"num_classes": n} if n else {})), None
    import transformers

    from .models import quiet_transformers

    quiet_transformers()
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # no or a broken config.json: the checkpoint folder is incomplete
        raise LilyDeployError(f"{path}: cannot read the base architecture from config.json "
                              f"({(str(exc).splitlines() or [''])[0][:160]})") from None
    from .models import AUTO_CLASSES

    model = getattr(transformers, AUTO_CLASSES[task]).from_config(hf_config)
    tokenizer = None
    if task != "image-cls":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        except Exception:
            tokenizer = None
    return model, tokenizer


def load_deploy(path: str | Path) -> LilyDeployModel:
    """Rebuild a deploy model from a checkpoint folder written by :func:`save_deploy`."""
    from .peft_bridge import set_module

    from .weights import check_safetensors

    path = Path(path)
    config = schema.read_json(path / DEPLOY_CONFIG, schema.DEPLOY_CONFIG, "deploy checkpoint config")
    if config["layers"] and not config.get("lily"):
        raise LilyDeployError(f"{path / DEPLOY_CONFIG}: field 'lily' is missing (the layers need r, num_B, scaling)")
    if config.get("format") != FORMAT:
        raise LilyDeployError(f"{path / DEPLOY_CONFIG}: unknown format {config.get('format')!r} (expected {FORMAT})")
    shapes = check_safetensors(path / WEIGHTS)
    model, tokenizer = _build_architecture(path, config)
    model.eval()
    context = RoutingContext()
    lily = config["lily"]
    lps: dict[str, nn.Linear] = {}
    pools: dict[str, HPPool] = {}
    specs = {}
    for name, spec in config["layers"].items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise LilyDeployError(f"{path / DEPLOY_CONFIG}: layer {name} is not in the base architecture") from None
        if not isinstance(base, nn.Linear):
            raise LilyDeployError(f"{path}: layer {name} is not a Linear in the base architecture")
        r, num_hp = int(lily["r"]), int(lily["num_B"])
        if spec["lp"] not in lps:
            lps[spec["lp"]] = nn.Linear(base.in_features, r, bias=False)
        if spec["hp_pool"] not in pools:
            pools[spec["hp_pool"]] = HPPool(num_hp, r, base.out_features)
        layer = LilyLinear(base, lps[spec["lp"]], nn.Linear(r, num_hp, bias=False), pools[spec["hp_pool"]],
                           lily["scaling"], mode=spec["mode"], context=context)
        if spec["mode"] == "static":
            if spec.get("static_p") is None:
                raise LilyDeployError(f"{path / DEPLOY_CONFIG}: layer {name} is static but has no static_p")
            if len(spec["static_p"]) != num_hp:
                raise LilyDeployError(f"{path / DEPLOY_CONFIG}: layer {name} has a static_p of "
                                      f"{len(spec['static_p'])} entries; its HP pool has {num_hp}")
            layer.set_static(torch.tensor(spec["static_p"]))
        set_module(model, name, layer)
        specs[name] = {k: spec[k] for k in ("target", "lp", "hp_pool")}
    from safetensors.torch import load_model as st_load_model

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in shapes.items():
        if key in expected and expected[key] != shape:
            raise LilyDeployError(f"{path / WEIGHTS}: {key} has shape {list(shape)}, the model needs {list(expected[key])}")
    try:
        st_load_model(model, str(path / WEIGHTS), strict=True)
    except RuntimeError as exc:
        raise LilyDeployError(f"{path / WEIGHTS}: does not match {DEPLOY_CONFIG} ({str(exc).splitlines()[0]})") from None
    _check_folded_and_labels(path, config, model)
    meta = {k: config.get(k) for k in ("base_model", "base_kind", "adapter", "lily", "labels")}
    for k in ("fold",):
        if k in config:
            meta[k] = config[k]
    return LilyDeployModel(model, context, config["task"], specs, meta, tokenizer=tokenizer,
                           folded=config.get("folded"), image_size=config.get("image_size"))


def _check_folded_and_labels(path: Path, config: dict, model: nn.Module) -> None:
    """A checkpoint's ``folded`` names layers of the model, and its labels fit the classification head."""
    modules = dict(model.named_modules())
    for name in config.get("folded") or {}:
        if name not in modules:
            raise LilyDeployError(f"{path / DEPLOY_CONFIG}: folded layer {name} is not in the base architecture")
    labels = config.get("labels")
    n = getattr(getattr(model, "config", None), "num_labels", None)
    if labels and config.get("task") in ("seq-cls", "image-cls", "token-cls") and n and len(labels) != n:
        raise LilyDeployError(f"{path / DEPLOY_CONFIG}: {len(labels)} labels for a {n}-way classification head")


def plain_deploy_model(spec: str):
    """A base model with no Lily layers, wrapped so it exports and validates like a Lily model."""
    from .models import load_base

    from .models import new_modules

    base = load_base(spec)
    meta = {"base_model": base.spec, "base_kind": base.kind, "adapter": None, "lily": None, "labels": None}
    if base.new_weights:  # a backbone loaded with a task head it does not have: said where the model is used
        meta["new_modules"] = new_modules(base.model, base.new_weights) or list(base.new_weights)
    return LilyDeployModel(base.model, RoutingContext(), base.task, {}, meta, tokenizer=base.tokenizer,
                           image_size=base.image_size)


def open_model(source: str | Path, base: Optional[str] = None):
    """A deploy model from an adapter folder, a deploy checkpoint, or a plain base model."""
    from .adapters import is_adapter_dir

    path = Path(str(source))
    if (path / DEPLOY_CONFIG).is_file() or is_adapter_dir(path):
        return load_model(path, base=base)
    return plain_deploy_model(str(source))
