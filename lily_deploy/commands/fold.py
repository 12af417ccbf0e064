"""``lily-deploy fold``."""
import click

from .options import base_option, data_column_options, make_config, usage_errors

# FoldConfig field -> flag, where the flag is not --field-name
FLAGS = {"source": "MODEL_DIR", "output": "-o", "strategy": "--fold", "size": "--calib-size"}


@click.command("fold")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration data: TSV/CSV/JSONL or image folder; a causal LM: prompt/response (or text) JSONL.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Deploy checkpoint folder to write.")
@click.option("--fold", "strategy", type=click.Choice(["auto", "all", "none"]), default="auto", show_default=True,
              help="auto: the most layers within budget; all: every layer; none: report only.")
@click.option("--max-metric-drop", default=0.1, show_default=True,
              help="Budget: largest drop of the calibration metric, in percentage points.")
@click.option("--max-output-error", type=float, default=None,
              help="Never fold a layer whose relative output error exceeds this (e.g. 0.01).")
@click.option("--routing", type=click.Choice(["batch", "sample", "token", "prompt", "causal"]), default=None,
              help="Routing of the layers left dynamic (and of the reference the budget is measured against). "
                   "Encoders: batch, sample (default) or token. Decoders: prompt, causal or token, exact under a "
                   "KV cache (default: as trained, else prompt).")
@click.option("--calib-size", default=256, show_default=True, help="Calibration rows to use.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--max-length", default=128, show_default=True)
@click.option("--random-inputs", is_flag=True,
              help="Calibrate on random inputs (no --calib; metric = agreement, a decoder's at every position).")
@data_column_options
@base_option
def command(model_dir, calib, output, strategy, max_metric_drop, max_output_error, routing, calib_size,
            batch_size, max_length, random_inputs, text_column, label_column, base):
    """Fold static router paths of MODEL_DIR (adapter folder or checkpoint) into the base weights.

    Decoders are measured by greedy next-token agreement with the unfolded model on the
    response tokens of the calibration prompts.
    """
    from ..folding import REPORT, FoldConfig, fold

    config = make_config(FoldConfig, flags=FLAGS, source=model_dir, output=output, calib=calib, strategy=strategy,
                         max_metric_drop=max_metric_drop, max_output_error=max_output_error, routing=routing,
                         size=calib_size, batch_size=batch_size, max_length=max_length, text_column=text_column,
                         label_column=label_column, random_inputs=random_inputs, base=base)
    with usage_errors(FLAGS):  # a routing or column the loaded model cannot take is still a bad flag
        report = fold(config)
    click.echo(report.table())
    click.echo(f"wrote {output} (deploy checkpoint) and {output}/{REPORT}")
