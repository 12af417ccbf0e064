"""Option types and decorators shared by several commands."""
from __future__ import annotations

import contextlib


import click

from ..core.modes import MODES


def parse_tolerances(values, flag: str) -> dict[str, float]:
    """``1e-4`` (all outputs) or ``logits:1e-4`` pairs -> {output name or "*": tol}."""
    out: dict[str, float] = {}
    for item in values or ():
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            name, _, tol = part.rpartition(":")
            try:
                value = float(tol)
            except ValueError:
                raise click.BadParameter(f"{part!r}: expected NAME:TOL or TOL, e.g. logits:1e-4", param_hint=flag)
            if value < 0:
                raise click.BadParameter(f"{part!r}: tolerance must be >= 0", param_hint=flag)
            out[name or "*"] = value
    return out


def int_list(ctx, param, value):
    if value is None:
        return None
    try:
        items = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers, e.g. 1,8")
    if not items or any(v <= 0 for v in items):
        raise click.BadParameter(f"{value!r}: expected positive integers")
    return items


routing_choice = click.Choice(MODES)


def base_option(f):
    return click.option("--base", default=None, metavar="NAME_OR_DIR",
                        help="Base model for an adapter folder (default: the one the adapter names).")(f)


def data_column_options(f):
    f = click.option("--label-column", default=None, help="Label column (default: label, labels, class, target).")(f)
    f = click.option("--text-column", default=None, help="Text column (default: text, sentence, ...).")(f)
    return f


@contextlib.contextmanager
def usage_errors(flags: dict | None = None):
    """Turn a :class:`~lily_deploy.core.config.ConfigError` raised inside into a usage error naming its flag.

    A field can be refuted while the stage runs (a shape the model does not have, an exclusion the
    graph lacks): that is still a bad flag value, exit 2. ``flags`` maps fields to flags where the
    flag is not ``--field-name``.
    """
    from ..core.config import ConfigError

    try:
        yield
    except ConfigError as exc:
        flag = (flags or {}).get(exc.field, "--" + exc.field.replace("_", "-"))
        raise click.BadParameter(exc.detail, param_hint=f"'{flag}'") from None


def make_config(cls, flags: dict | None = None, **fields):
    """Build a stage config from CLI values; a bad field becomes a usage error naming its flag (exit 2)."""
    with usage_errors(flags):
        return cls(**fields)
