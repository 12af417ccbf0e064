"""The ``lily-deploy`` command line: a thin layer over the library.

Commands are loaded lazily (one module per command under ``lily_deploy.commands``) so
``lily-deploy --help`` stays fast and works without TensorRT or other heavy extras.
A :class:`LilyDeployError` becomes one line on stderr and exit status 1; ``--debug``
shows the traceback instead.
"""
from __future__ import annotations

import importlib
import os
import sys

import click

from .core.errors import LilyDeployError

# command name -> (module under lily_deploy.commands, one-line help); order is the pipeline's
COMMANDS = {
    "inspect": ("inspect", "Show an adapter's or checkpoint's Lily structure and router statistics."),
    "finetune": ("finetune", "Fine-tune a model with Lily (or LoRA) on a text or image dataset."),
    "fold": ("fold", "Fold static router paths into the base weights; write a deploy checkpoint."),
    "export": ("export", "Export to ONNX with lily::HPMix custom ops (and their bodies); validate against torch."),
    "quantize": ("quantize", "Write FP16 or INT8 (Q/DQ) ONNX from calibration data; validate accuracy."),
    "adapter": ("adapter", "Pack a Lily adapter for a switchable graph (export --switchable), chosen per request."),
    "build-trt": ("build_trt", "Build a TensorRT or TensorRT-for-RTX engine from an ONNX file."),
    "generate": ("generate", "Generate text from a Lily decoder with a KV cache (torch or onnxruntime)."),
    "parity": ("parity", "Check accuracy parity of ONNX/TensorRT candidates against the torch reference."),
    "bench": ("bench", "Measure latency and throughput across backends in one interleaved run."),
    "quickstart": ("quickstart", "Run the whole pipeline on an embedded default: fine-tune to engine."),
}


class LilyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name, (mod, _) in COMMANDS.items() if importlib.util.find_spec(f"lily_deploy.commands.{mod}")]

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, _ = COMMANDS[name]
        try:
            module = importlib.import_module(f"lily_deploy.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lily_deploy.commands.{module_name}":
                return None
            raise
        return getattr(module, "command")

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx):
        debug = bool(ctx.find_root().params.get("debug") or os.environ.get("LILY_DEPLOY_DEBUG"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except LilyDeployError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            _interrupted(ctx)
        except OSError as exc:  # a full disk, a read-only folder, a permission: the user's to fix
            if debug:
                raise
            click.echo(f"error: {os_error_line(exc)}", err=True)
            ctx.exit(1)
        except ImportError as exc:
            if _caused_by_interrupt(exc) and not debug:  # onnxruntime turns Ctrl-C during its import into this
                _interrupted(ctx)
            raise


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: what failed, on which file, and (for the usual ones) what to do."""
    import errno

    where = f"{exc.filename}: " if exc.filename else ""
    why = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free some space or write the output elsewhere",
            errno.EROFS: "write the output to a writable folder",
            errno.EACCES: "check the file's permissions or write the output elsewhere",
            errno.EDQUOT: "free some space or write the output elsewhere"}.get(exc.errno)
    return f"{where}{why}" + (f" ({hint}; nothing partial was left behind)" if hint else "")


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _interrupted(ctx) -> None:
    click.echo("interrupted: no partial output was left behind", err=True)
    ctx.exit(130)


@click.group(cls=LilyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (also LILY_DEPLOY_DEBUG=1).")
@click.version_option(package_name="lily-deploy")
@click.pass_context
def cli(ctx, debug):
    """lily-deploy: Lily adapters from fine-tuning to ONNX and TensorRT, with measured parity.

    \b
    Pipeline:  finetune -> fold -> export -> quantize -> build-trt -> parity / bench
    Try it:    lily-deploy quickstart -o out/quickstart
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        cli(prog_name="lily-deploy")
    except KeyboardInterrupt:  # Ctrl-C outside a command (at start-up or exit)
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    sys.exit(main())
