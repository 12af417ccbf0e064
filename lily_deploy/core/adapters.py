"""PEFT-Lily adapter folders: validation and loading onto their base model.

An adapter folder is what PEFT writes (``adapter_config.json`` + ``adapter_model.safetensors``);
``finetune`` adds ``lily_deploy.json`` beside them (label map, base short name). Every way such
a folder can be wrong is reported in one line naming the file or layer at fault.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from . import schema
from .errors import LilyDeployError
from .fileio import sha256_dir
from .models import LABELLED_TASKS, PEFT_TASK_TO_TASK, BaseModel, load_base, random_weights
from .weights import check_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIDECAR = "lily_deploy.json"
_LILY_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<part>lily_A|lily_B|lily_router)(?:\.[^.]+)?\.weight$")


@dataclass
class AdapterInfo:
    """What an adapter folder says about itself."""

    path: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]
    sidecar: dict = field(default_factory=dict)

    @property
    def base_spec(self) -> Optional[str]:
        return self.sidecar.get("base_model") or self.config.get("base_model_name_or_path")

    @property
    def task(self) -> Optional[str]:
        return self.sidecar.get("task") or PEFT_TASK_TO_TASK.get(self.config.get("task_type") or "")

    @property
    def labels(self) -> Optional[list[str]]:
        return self.sidecar.get("labels")

    def sha256(self) -> str:
        return sha256_dir(self.path)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter(path: str | Path) -> AdapterInfo:
    """Validate an adapter folder without loading any model."""
    path = Path(path)
    if not path.exists():
        raise LilyDeployError(f"{path} does not exist")
    if not path.is_dir() or not (path / ADAPTER_CONFIG).is_file():
        raise LilyDeployError(f"{path} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    config = schema.read_json(path / ADAPTER_CONFIG, {"peft_type": schema.ADAPTER_CONFIG["peft_type"]}, "adapter config")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LILY":
        raise LilyDeployError(
            f"{path} holds a {peft_type or 'untyped'} adapter; lily-deploy needs a Lily adapter (peft_type LILY)"
        )
    schema.check(config, schema.ADAPTER_CONFIG, str(path / ADAPTER_CONFIG))
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        extra = " (only safetensors is loaded; adapter_model.bin is not)" if (path / "adapter_model.bin").exists() else ""
        raise LilyDeployError(f"{path}: missing {ADAPTER_WEIGHTS}{extra}")
    shapes = check_safetensors(weights)
    sidecar = {}
    if (path / SIDECAR).is_file():
        sidecar = schema.read_json(path / SIDECAR, schema.SIDECAR, "lily-deploy sidecar")
    return AdapterInfo(path=path, config=config, shapes=shapes, sidecar=sidecar)


def _head_num_labels(info: AdapterInfo, base: BaseModel) -> Optional[int]:
    """Number of labels implied by the saved classification head, if it differs from the base's."""
    params = dict(base.model.named_parameters())
    for key, shape in info.shapes.items():
        if "lily_" in key:
            continue
        name = key.removeprefix("base_model.model.")
        name = name.replace(".modules_to_save.default.", ".")
        current = params.get(name)
        if current is not None and len(shape) >= 1 and tuple(current.shape) != shape:
            if tuple(current.shape[1:]) == shape[1:]:
                return shape[0]
    return None


def check_fits(info: AdapterInfo, model: nn.Module, base_name: str) -> None:
    """Every Lily tensor must sit on a Linear of the base with matching shapes."""
    modules = dict(model.named_modules())
    r, num_b = int(info.config["r"]), int(info.config["num_B"])
    for key, shape in info.shapes.items():
        m = _LILY_KEY.match(key)
        if not m:
            continue
        layer_path, part = m.group("path"), m.group("part")
        layer = modules.get(layer_path)
        if layer is None:
            raise LilyDeployError(f"adapter {info.path} does not fit {base_name}: no layer {layer_path} in the base model")
        if not isinstance(layer, nn.Linear):
            raise LilyDeployError(
                f"adapter {info.path}: layer {layer_path} is {type(layer).__name__}; Lily adapts nn.Linear only"
            )
        expected = {
            "lily_A": (r, layer.in_features),
            "lily_B": (num_b * r, layer.out_features),
            "lily_router": (num_b, r),
        }[part]
        if tuple(shape) != expected:
            raise LilyDeployError(
                f"adapter {info.path} does not fit {base_name}: {layer_path}.{part} has shape "
                f"{list(shape)}, the base layer needs {list(expected)}"
            )


def adapter_weight_names(info: AdapterInfo) -> set[str]:
    """The base-model parameters an adapter folder carries in full (its ``modules_to_save``), by model key."""
    names = set()
    for key in info.shapes:
        if _LILY_KEY.match(key):
            continue
        name = key.removeprefix("base_model.model.")
        names.add(re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", name))
    return names


def check_no_random_weights(info: AdapterInfo, base: BaseModel) -> None:
    """Refuse a load that leaves parameters at random: new in the base (a head of another task) and not in the adapter."""
    held = adapter_weight_names(info)
    left = [k for k in random_weights(base.model, base.new_weights) if k not in held]
    if left:
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        raise LilyDeployError(
            f"adapter {info.path} on {base.spec} as {base.task}: {left[0]}{more} would be initialised at random "
            f"(neither the base model nor the adapter holds it), so every load would give other outputs; was it "
            f"trained for another task (its task_type: {info.config.get('task_type')}) or base (--base chooses)?"
        )


def load_adapter(path: str | Path, base: Optional[str] = None) -> tuple[Any, BaseModel, AdapterInfo]:
    """``(peft_model, base, info)``: the PEFT-Lily model, exactly as PEFT builds it."""
    info = read_adapter(path)
    spec = base or info.base_spec
    if not spec:
        raise LilyDeployError(f"{path}: adapter names no base model; pass --base")
    try:
        base_model = load_base(spec, task=info.task, num_labels=len(info.labels) if info.labels else None,
                               labels=info.labels)
    except LilyDeployError as exc:
        raise LilyDeployError(f"{exc} (base of adapter {path}; pass --base to choose another)") from None
    if base_model.task in LABELLED_TASKS and not info.labels:
        n = _head_num_labels(info, base_model)
        if n is not None:
            base_model = load_base(spec, task=base_model.task, num_labels=n)
    check_fits(info, base_model.model, base_model.spec)
    check_no_random_weights(info, base_model)
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(base_model.model, str(info.path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise LilyDeployError(f"adapter {path}: PEFT could not load it ({str(exc).splitlines()[0]})") from None
    peft_model.eval()
    return peft_model, base_model, info


def random_lily_adapter(base: str, out: str | Path, targets: Sequence[str], num_labels: Optional[int] = None,
                        task: str = "seq-cls", rank: int = 8, num_hp: int = 3, lp_stride: int = 2,
                        scale: float = 1.0, seed: int = 0, labels: Optional[Sequence[str]] = None) -> Path:
    """Save a PEFT-Lily adapter with random non-zero HPs (as after training), seeded.

    For latency measurements (which do not depend on the values) and tests; PEFT's own
    initialisation would leave the HPs at zero, which hides the adapter's arithmetic.
    """
    import torch
    from peft import LilyConfig, get_peft_model

    from .models import TASK_TO_PEFT_TASK, new_modules

    torch.manual_seed(seed)
    b = load_base(base, task=task, num_labels=num_labels, labels=list(labels) if labels else None)
    to_save = new_modules(b.model, b.new_weights) or ["classifier"]
    cfg = LilyConfig(r=rank, stride_A=lp_stride, num_B=num_hp, scaling=scale, target_modules=list(targets),
                     modules_to_save=to_save, task_type=TASK_TO_PEFT_TASK.get(task), init_weights=False)
    out = Path(out)
    get_peft_model(b.model, cfg).save_pretrained(str(out))
    if labels:
        (out / SIDECAR).write_text(json.dumps({"base_model": b.spec, "task": task, "labels": list(labels)}))
    return out
