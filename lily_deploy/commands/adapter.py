"""``lily-deploy adapter``: adapters for switchable graphs (``export --switchable``)."""
import click

from .options import base_option, make_config, usage_errors

# PackConfig field -> flag, where the flag is not --field-name
FLAGS = {"adapter": "ADAPTER", "graph": "--for", "output": "-o"}


@click.group("adapter")
def command():
    """Adapters for one switchable base graph or engine (export --switchable), chosen per request.

    \b
    lily-deploy export ADAPTER_A -o base.onnx --switchable
    lily-deploy adapter pack ADAPTER_B --for base.onnx -o b.onnx_adapter
    lily-deploy parity ADAPTER_B --candidate base.onnx+b.onnx_adapter
    """


@command.command("pack")
@click.argument("adapter", type=str)
@click.option("--for", "graph", required=True, type=click.Path(dir_okay=False),
              help="The switchable ONNX graph (from export --switchable) the adapter is for.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="ONNX Runtime adapter file to write (.onnx_adapter).")
@base_option
def pack(adapter, graph, output, base):
    """Check that ADAPTER (Lily adapter folder or unfolded checkpoint) fits the graph; write it as .onnx_adapter.

    The LPs, routers, HP pools and (when the adapter trains one) the classification head go in
    the file; a tensor of another name or shape, or another base model, is refused naming it.
    """
    from ..switchable import PackConfig, pack_adapter

    config = make_config(PackConfig, flags=FLAGS, adapter=adapter, graph=graph, output=output, base=base)
    with usage_errors(FLAGS):
        result = pack_adapter(config)
    for note in result.notes:
        click.echo(f"note: {note}")
    head = "with its classification head" if result.head else "no classification head (the adapter trains none)"
    click.echo(f"{result.tensors} adapter tensors, {result.bytes / 1024:.1f} KiB, {head}")
    click.echo(f"wrote {result.path} (run it: {graph}+{result.path})")
