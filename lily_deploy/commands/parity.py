"""``lily-deploy parity``: a thin layer over :func:`lily_deploy.parity_check.run_parity`."""
import click

from .options import base_option, data_column_options, int_list, make_config, parse_tolerances, usage_errors

FLAGS = {"candidates": "--candidate"}


def _tolerances(ctx, param, values):
    return parse_tolerances(values, f"--{param.name.replace('_', '-')}")


@click.command("parity")
@click.option("--reference", required=True, metavar="MODEL_OR_ADAPTER",
              help="The torch reference: adapter folder, deploy checkpoint, or base model (e.g. minilm).")
@click.option("--candidate", "candidates", multiple=True, required=True, metavar="FILE_OR_DIR",
              help="An ONNX file (onnxruntime), an engine .plan (TensorRT, GPU only) or a model folder (torch); "
                   "repeat for several.")
@click.option("--data", type=click.Path(), default=None,
              help="Real inputs (TSV/CSV/JSONL or image folder; a causal LM: JSONL with a 'prompt' field). "
                   "Without it: seeded generated inputs, metric agreement (a causal LM: built-in prompts).")
@click.option("--metric", type=click.Choice(["accuracy", "f1", "mcc", "agreement"]), default=None,
              help="Task metric (default: accuracy with labels, else agreement). f1 is binary F1 of class 1 for "
                   "two classes, else macro.")
@click.option("--atol", multiple=True, callback=_tolerances, metavar="[PREC:][NAME:]TOL",
              help="Abs-diff tolerance, e.g. logits:1e-4, int8:logits:0.05, fp16:1e-2 (default fp32 logits:1e-4; "
                   "fp16/int8 are judged on agreement and metric).")
@click.option("--atol-stat", type=click.Choice(["max", "mean", "p99"]), default="max", show_default=True,
              help="Statistic of |candidate - reference| held to --atol.")
@click.option("--min-agreement", multiple=True, callback=_tolerances, metavar="[PREC:]PCT",
              help="Top-1 agreement floor in percent (default fp32 100, fp16 99, bf16 98, int8 95).")
@click.option("--max-metric-drop", multiple=True, callback=_tolerances, metavar="[PREC:]POINTS",
              help="Largest metric drop in points (default fp32 0, fp16 0.5, bf16 1, int8 1).")
@click.option("--invariance-atol", multiple=True, callback=_tolerances, metavar="[PREC:]TOL",
              help="Batch-invariance tolerance (default fp32 1e-4, fp16 1e-2, bf16/int8 5e-2).")
@click.option("--batch-sizes", callback=int_list, default="1,8", show_default=True,
              help="Batch sizes every comparison runs at (batches are mixed and padded).")
@click.option("--routing", type=click.Choice(["batch", "sample", "token", "prompt", "causal"]), default=None,
              help="Reference routing for candidates that record none (default sample; a causal LM: as trained; "
                   "each ONNX's own lily_deploy.routing is followed). prompt and causal are for decoders.")
@click.option("--limit", type=int, default=None, help="Use the first N rows (prompts) of --data.")
@click.option("--max-new-tokens", default=32, show_default=True,
              help="Causal LM: greedy tokens generated per prompt.")
@click.option("--max-length", default=128, show_default=True, help="Token limit per text.")
@click.option("--num-generated", default=64, show_default=True, help="Generated samples when no --data.")
@click.option("--invariance-samples", default=8, show_default=True,
              help="Samples of mixed lengths checked alone vs in one padded batch.")
@click.option("--threads", type=int, default=None, help="torch and onnxruntime threads (default: theirs).")
@click.option("--report-dir", type=click.Path(file_okay=False), default=None,
              help="Write parity.json, parity.md and parity.png here.")
@click.option("--allow-skips", is_flag=True,
              help="Exit 0 when every candidate was skipped (e.g. engines without a GPU); the last line then "
                   "says NOTHING COMPARED, never PASSED.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@data_column_options
@base_option
@click.pass_context
def command(ctx, reference, candidates, data, metric, atol, atol_stat, min_agreement, max_metric_drop,
            invariance_atol, batch_sizes, routing, limit, max_new_tokens, max_length, num_generated,
            invariance_samples, threads, report_dir, allow_skips, as_json, text_column, label_column, base):
    """Check that every candidate matches the torch reference on the same inputs.

    \b
    Per candidate: task metric and its delta, top-1 agreement, max/mean/p99 abs diff and cosine
    similarity of the logits, batch invariance (required for sample routing, a finding for batch
    routing), each judged by precision (read from the ONNX). Engines are SKIPPED where no GPU is.
    A causal-LM reference gets generation parity: greedy exact match, first diverging step and
    per-step logits diff at each batch size (left-padded), batch invariance and cache
    consistency; a reference trained with batch routing has its cache drift reported as a finding.
    Ends with one PASSED/FAILED line; exits 1 when any candidate fails, or when nothing was
    compared (every candidate skipped) unless --allow-skips.
    """
    import json

    from ..parity_check import ParityConfig, make_tolerances, run_parity

    tolerances = make_config(make_tolerances, flags={"stat": "--atol-stat"}, atol=atol, min_agreement=min_agreement,
                             max_metric_drop=max_metric_drop, invariance_atol=invariance_atol, stat=atol_stat)
    config = make_config(ParityConfig, flags=FLAGS, reference=reference,
                         candidates=candidates, data=data, metric=metric, tolerances=tolerances,
                         batch_sizes=batch_sizes, routing=routing, limit=limit, max_length=max_length,
                         text_column=text_column, label_column=label_column, base=base,
                         num_generated=num_generated, invariance_samples=invariance_samples, threads=threads,
                         allow_skips=allow_skips, max_new_tokens=max_new_tokens)
    inputs = {"reference": reference, "data": data, "base": base,
              **{f"candidate {c}": c for c in candidates}}
    if report_dir is not None:
        from ..report import check_report_dir

        check_report_dir(report_dir, "parity", inputs)
    with usage_errors(FLAGS):  # a field refuted once the reference is known (e.g. --metric for a causal LM)
        report = run_parity(config)
    data_json = report.to_json()
    if report_dir is not None:
        from ..report import write_reports

        paths = write_reports(data_json, report.markdown(), report_dir, inputs=inputs)
    click.echo(json.dumps(data_json, indent=2) if as_json else report.table())
    if report_dir is not None:
        written = ", ".join(str(p) for k, p in paths.items() if k != "png_note" and p is not None)
        click.echo(f"wrote {written}" + (f" ({paths['png_note']})" if paths.get("png_note") else ""), err=as_json)
    click.echo(report.final_line(), err=as_json)
    if not report:
        ctx.exit(1)
