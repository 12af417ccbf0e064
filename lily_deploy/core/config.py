"""Stage configs: frozen dataclasses that validate themselves, naming the field at fault.

Every stage (``finetune``, ``fold``, ``export``, ``quantize``, ``build_trt``, ``parity``,
``bench``, ``quickstart``) takes one config whose fields carry the defaults -- no ``None``
resolved deep inside. A bad value raises :class:`ConfigError` with the *field* name
("rank: must be >= 1"); the CLI maps fields to flags and re-raises it as a usage error that
names the flag ("--rank: must be >= 1", exit 2).

Stages accept either a config or its fields as keywords, the same way::

    finetune(FinetuneConfig(model="minilm", train="train.tsv"))
    finetune(model="minilm", train="train.tsv")          # same thing
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Optional, TypeVar

from .errors import LilyDeployError

C = TypeVar("C", bound="StageConfig")


class ConfigError(LilyDeployError):
    """A config field with a value it cannot take; ``field`` names it, ``detail`` says why."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = " ".join(str(detail).split())


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of every stage config: validated on construction, copied with :meth:`replace`."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Cross-field and range checks; raise :class:`ConfigError` naming the field."""

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def resolve(cls: type[C], config: Optional[C] = None, **fields: Any) -> C:
        """``config`` with ``fields`` applied, or a new config from ``fields``; unknown names are errors."""
        unknown = sorted(set(fields) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {unknown[0]!r} "
                            f"(fields: {', '.join(cls.field_names())})")
        if config is None:
            return cls(**fields)
        if not isinstance(config, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")
        return config.replace(**fields) if fields else config


# ------------------------------------------------------------------------- field checks

def as_tuple(value) -> tuple:
    """A config's list field as a tuple (a frozen config holds no list); one path or name alone is a list of one."""
    if isinstance(value, (str, os.PathLike)):
        return (value,)
    return tuple(value or ())



def check_number(field: str, value: Any, minimum: Optional[float] = None, maximum: Optional[float] = None,
                 strict_min: bool = False, integer: bool = False, allow_none: bool = False) -> None:
    """A finite number (an int when ``integer``) within the bounds; NaN and infinity are refused."""
    if value is None:
        if allow_none:
            return
        raise ConfigError(field, "a value is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, f"expected a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(field, f"expected an integer, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(field, f"must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        raise ConfigError(field, f"must be {'>' if strict_min else '>='} {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(field, f"must be <= {maximum:g}, got {value:g}")


def check_choice(field: str, value: Any, choices: Iterable[Any], allow_none: bool = False) -> None:
    choices = tuple(choices)
    if value is None and allow_none:
        return
    if value not in choices:
        raise ConfigError(field, f"{value!r}: choose one of {', '.join(map(str, choices))}")
