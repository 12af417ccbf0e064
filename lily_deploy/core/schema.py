"""One schema check per kind of JSON file the tool reads, so a malformed file is one line naming the field.

A schema is a dict ``field -> Field``; :func:`check` walks an object against it. It checks
only what the tool relies on (types, required keys, ranges, choices); unknown keys are kept,
since PEFT and transformers add fields between releases.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import LilyDeployError
from .modes import MODES


@dataclass(frozen=True)
class Field:
    types: tuple  # accepted Python types (bool is never an int here)
    required: bool = False
    minimum: Optional[float] = None
    choices: Optional[Sequence[Any]] = None
    items: Optional[tuple] = None  # element types of a list
    label: str = ""  # what a choice is, for the message ("routing mode")
    nested: Optional[dict] = None  # schema of a dict value
    each: Optional[dict] = None  # schema of every value of a dict value (e.g. layers)


def _type_name(types: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
             bool: "true/false", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _is(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def check(obj: Any, schema: dict, where: str) -> dict:
    """``obj`` if it is an object matching ``schema``; else a one-line error naming ``where`` and the field."""
    if not isinstance(obj, dict):
        raise LilyDeployError(f"{where}: expected a JSON object, got {_type_name((type(obj),))}")
    for name, f in schema.items():
        if name not in obj or obj[name] is None:
            if f.required:
                raise LilyDeployError(f"{where}: field {name!r} is missing")
            continue
        _check_value(obj[name], f, where, name)
    return obj


def _check_value(value: Any, f: Field, where: str, name: str) -> None:
    if not _is(value, f.types):
        raise LilyDeployError(f"{where}: field {name!r} must be {_type_name(f.types)}, got {value!r:.60}")
    if isinstance(value, float) and not math.isfinite(value):
        raise LilyDeployError(f"{where}: field {name!r} must be finite, got {value}")
    if f.minimum is not None and isinstance(value, (int, float)) and value < f.minimum:
        raise LilyDeployError(f"{where}: field {name!r} must be >= {f.minimum:g}, got {value}")
    if f.choices is not None and value not in f.choices:
        what = f"unknown {f.label} {value!r}" if f.label else f"{value!r} is not allowed"
        raise LilyDeployError(f"{where}: field {name!r}: {what}; choose one of {', '.join(map(str, f.choices))}")
    if f.items is not None and isinstance(value, list):
        bad = [v for v in value if not _is(v, f.items)]
        if bad:
            raise LilyDeployError(f"{where}: field {name!r} must hold {_type_name(f.items)} items, got {bad[0]!r:.60}")
    if f.nested is not None:
        check(value, f.nested, f"{where}: field {name!r}")
    if f.each is not None:
        for key, item in value.items():
            check(item, f.each, f"{where}: {name} {key!r}")


def read_json(path: str | Path, schema: dict, what: str = "file") -> dict:
    """Read and check a JSON file; unreadable, non-JSON or malformed content is one line naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LilyDeployError(f"{path}: not a valid JSON {what} ({exc})") from None
    except OSError as exc:
        raise LilyDeployError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return check(obj, schema, str(path))


INT, NUM, STR, LIST, DICT = (int,), (int, float), (str,), (list,), (dict,)

# PEFT's adapter_config.json for Lily: what lily-deploy reads of it
ADAPTER_CONFIG = {
    "peft_type": Field(STR, required=True),
    "r": Field(INT, required=True, minimum=1),
    "num_B": Field(INT, required=True, minimum=1),
    "stride_A": Field(INT, minimum=1),
    "scaling": Field(NUM),
    "target_modules": Field((list, str)),
    "base_model_name_or_path": Field(STR),
    "task_type": Field(STR),
    "modules_to_save": Field((list, str)),
}

# lily_deploy.json, written by finetune beside the adapter
SIDECAR = {
    "base_model": Field(STR),
    "task": Field(STR),
    "labels": Field(LIST, items=(str, int)),
    "routing": Field(STR, choices=MODES, label="routing mode"),
}

_LAYER = {
    "target": Field(STR, required=True),
    "lp": Field(STR, required=True),
    "hp_pool": Field(STR, required=True),
    "mode": Field(STR, required=True, choices=MODES, label="routing mode"),
    "static_p": Field((list,), items=(int, float)),
}
_LILY = {"r": Field(INT, required=True, minimum=1), "num_B": Field(INT, required=True, minimum=1),
         "scaling": Field(NUM, required=True)}

# deploy_config.json of a deploy checkpoint (save_deploy)
DEPLOY_CONFIG = {
    "format": Field(STR, required=True),
    "task": Field(STR, required=True),
    "base_model": Field(STR),
    "base_kind": Field(STR),
    "labels": Field(LIST, items=(str, int)),
    "lily": Field(DICT, nested=_LILY),
    "layers": Field(DICT, required=True, each=_LAYER),
    "folded": Field(DICT),
    "image_size": Field(INT, minimum=1),
}

_TENSOR = {"name": Field(STR, required=True), "dtype": Field(STR)}

# ENGINE.json, the build report beside an engine
BUILD_REPORT = {
    "backend": Field(DICT, nested={"name": Field(STR), "version": Field(STR), "module": Field(STR)}),
    "target": Field(DICT, nested={"compute_capabilities": Field(LIST, items=(str,))}),
    "inputs": Field(LIST, items=(dict,)),
    "outputs": Field(LIST, items=(dict,)),
    "precision": Field(DICT),
    "onnx": Field(DICT),
    "route": Field(STR),
}


def check_tensors(report: dict, where: str) -> None:
    """Each input/output entry of a build report names a tensor."""
    for key in ("inputs", "outputs"):
        for i, t in enumerate(report.get(key) or []):
            check(t, _TENSOR, f"{where}: {key}[{i}]")

