"""``lily-deploy bench``: a thin layer over :func:`lily_deploy.benchmark.run_bench`."""
import click

from .options import int_list, make_config


def _backends(ctx, param, value):
    from ..benchmark import BACKENDS

    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    aliases = {"ort": "onnxruntime", "onnxruntime-cpu": "onnxruntime", "ort-cuda": "onnxruntime-cuda",
               "trt": "tensorrt", "torch-cpu": "torch", "eager": "torch"}
    items = [aliases.get(v, v) for v in items]
    bad = [v for v in items if v not in BACKENDS]
    if bad or not items:
        raise click.BadParameter(f"{bad[0] if bad else value!r}: choose from {', '.join(BACKENDS)}")
    return items


@click.command("bench")
@click.argument("models", nargs=-1, metavar="MODEL...")
@click.option("--batch-sizes", callback=int_list, default="1,8,32", show_default=True)
@click.option("--seq-lens", callback=int_list, default="32,128,512", show_default=True,
              help="Sequence lengths (ignored for image models; prompt lengths for decoders).")
@click.option("--new-tokens", default=32, show_default=True,
              help="Decoders: greedy decode steps with the KV cache timed per iteration.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime (default: torch's).")
@click.option("--warmup", default=3, show_default=True, help="Warm-up calls per runner and shape.")
@click.option("--iters", default=20, show_default=True, help="Timed calls per runner and shape (interleaved).")
@click.option("--backends", callback=_backends, default=None, metavar="LIST",
              help="Comma list of torch, torch-cuda, onnxruntime, onnxruntime-cuda, tensorrt "
                   "(default: every one that applies and is available).")
@click.option("--base", "base", multiple=True, metavar="MODEL",
              help="Base model (path or label; benchmarked too): adds each row's latency ratio to it on the "
                   "same backend. Repeat for one per backend, e.g. --base minilm --base base.onnx.")
@click.option("--routing", type=click.Choice(["batch", "sample", "token"]), default="sample", show_default=True,
              help="Routing of Lily models run in torch (ONNX files carry their own).")
@click.option("--base-model", default=None, metavar="NAME_OR_DIR",
              help="Base model for adapter folders (default: the one each adapter names).")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure each runner's peak memory in a fresh process (a few seconds per runner).")
@click.option("--report-dir", type=click.Path(file_okay=False), default=None,
              help="Write bench.json, bench.md and bench.png here.")
@click.option("--markdown", is_flag=True, help="Print the Markdown table instead of the text table.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
def command(models, batch_sizes, seq_lens, new_tokens, threads, warmup, iters, backends, base, routing, base_model, memory,
            report_dir, markdown, as_json):
    """Latency p50/p90/p99, throughput and memory of each MODEL on each backend, in one interleaved run.

    \b
    MODEL is an ONNX file (onnxruntime), an engine .plan (TensorRT, GPU only), an adapter folder
    or deploy checkpoint (torch eager), or a base model name such as minilm; LABEL=MODEL names it
    in the table. Runners take turns call by call so a noisy machine slows all alike.
    Causal LMs (graphs with a KV cache, decoder adapters) are timed by generation: prefill ms
    and decode tokens/s over --new-tokens greedy steps, with ratios to --base.
    Example:  lily-deploy bench base=minilm lily=out/adapter base=base.onnx lily=lily.onnx
              --base base --batch-sizes 1,8 --seq-lens 128
    """
    import json

    from ..benchmark import BenchConfig, parse_model, run_bench

    config = make_config(BenchConfig, flags={"models": "MODEL"}, models=models, batch_sizes=batch_sizes,
                         seq_lens=seq_lens, new_tokens=new_tokens, threads=threads, warmup=warmup, iters=iters, backends=backends, base=base,
                         routing=routing, base_model=base_model, memory=memory)
    inputs = {f"model {m.spec}": m.spec for m in map(parse_model, (*models, *base))}
    inputs["--base-model"] = base_model
    if report_dir is not None:
        from ..report import check_report_dir

        check_report_dir(report_dir, "bench", inputs)
    report = run_bench(config)
    data = report.to_json()
    if report_dir is not None:
        from ..report import write_reports

        paths = write_reports(data, report.markdown(), report_dir, inputs=inputs)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(report.markdown() if markdown else report.table())
    if report_dir is not None:
        written = ", ".join(str(p) for k, p in paths.items() if k != "png_note" and p is not None)
        click.echo(f"wrote {written}" + (f" ({paths['png_note']})" if paths.get("png_note") else ""), err=as_json)
