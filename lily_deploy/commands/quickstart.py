"""``lily-deploy quickstart``."""
import click

from .options import make_config

# QuickstartConfig field -> flag, where the flag is not --field-name
FLAGS = {"output": "-o", "engine": "--no-engine", "bench": "--no-bench"}


@click.command("quickstart")
@click.option("-o", "--output", default="out/quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every artifact and summary.json.")
@click.option("--train", type=click.Path(), default=None, help="Your training data instead of the embedded set.")
@click.option("--val", type=click.Path(), default=None, help="Your validation data (with --train).")
@click.option("--steps", default=250, show_default=True, help="Fine-tuning steps (about 3 minutes on 2 CPU cores).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--no-engine", is_flag=True, help="Skip the TensorRT build.")
@click.option("--no-bench", is_flag=True, help="Skip the latency benchmark.")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming finished stages.")
def command(output, train, val, steps, batch_size, no_engine, no_bench, fresh):
    """Fine-tune MiniLM with Lily, fold, export, quantize, build, check parity and benchmark -- one command.

    Needs nothing but the packaged MiniLM; a rerun after an interruption resumes where it stopped.
    """
    from ..pipeline import QuickstartConfig, format_summary, quickstart

    config = make_config(QuickstartConfig, flags=FLAGS, output=output, train=train, val=val, steps=steps,
                         batch_size=batch_size, engine=not no_engine, bench=not no_bench, fresh=fresh,
                         log=click.echo)
    summary = quickstart(config)
    click.echo("\n" + format_summary(summary))
