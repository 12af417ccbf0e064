"""``lily-deploy quantize``: a thin layer over :func:`lily_deploy.precision.quantize`."""
import click

from .options import data_column_options, make_config, usage_errors

# QuantizeConfig field -> flag, where the flag is not --field-name
FLAGS = {"model_path": "MODEL.onnx", "output": "-o", "precision": "--int8/--fp16/--int4", "new_tokens": "--new-tokens",
         "keep_sensitive": "--no-keep-sensitive"}


def _names(ctx, param, value):
    return [v.strip() for item in value or () for v in str(item).split(",") if v.strip()]


def _size(ctx, param, value):
    """A row count, or 'all' (None); its range is QuantizeConfig's to check."""
    if value is None or str(value).lower() == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a number of rows or 'all'")


@click.command("quantize")
@click.argument("onnx_file", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--int8", "precision", flag_value="int8", help="INT8 Q/DQ from calibration data (needs --calib).")
@click.option("--fp16", "precision", flag_value="fp16", help="FP16 weights and activations, fp32 inputs/outputs.")
@click.option("--int4", "precision", flag_value="int4",
              help="Decoders: INT4 weight-only (blockwise, symmetric) for the linear layers' weights.")
@click.option("--block-size", default=32, show_default=True, type=int,
              help="--int4: weights per scale along the input dimension (16, 32, 64, 128 or 256).")
@click.option("--int4-target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="--int4: onnxruntime's MatMulNBits, or blockwise INT4 DequantizeLinear "
                                      "weights (what TensorRT builds).")
@click.option("--int4-method", type=click.Choice(["rtn", "hqq", "gptq"]), default="rtn", show_default=True,
              help="--int4: round-to-nearest, HQQ, or GPTQ (calibrated on --calib prompts); hqq/gptq: onnxruntime "
                   "target only.")
@click.option("--int4-embedding", is_flag=True,
              help="--int4 (onnxruntime target, rtn): the token embedding too (GatherBlockQuantized).")
@click.option("--new-tokens", default=16, show_default=True, type=int,
              help="Decoders: greedy tokens per prompt for validation (and for calibration).")
@click.option("--min-token-agreement", default=90.0, show_default=True, type=float, metavar="PERCENT",
              help="Decoders: exit 1 when fewer greedy steps agree with the fp32 decoder.")
@click.option("--max-ppl-increase", default=5.0, show_default=True, type=float, metavar="PERCENT",
              help="Decoders: exit 1 when response/text perplexity rises by more than this.")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration data: TSV/CSV/JSONL text, image folder, or .npz (one array per input).")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="How activation ranges are set from the calibration data.")
@click.option("--calib-size", default="256", show_default=True, callback=_size,
              help="Calibration rows (a seeded random choice), or 'all'.")
@click.option("--seed", default=0, show_default=True, help="Seed of the calibration (and validation) row choice.")
@click.option("--batch-size", default=16, show_default=True, help="Rows per calibration/validation batch.")
@click.option("--max-length", default=128, show_default=True, help="Token limit per text.")
@click.option("--val", type=click.Path(), default=None,
              help="Held-out validation data (default: rows of --calib that calibration did not use).")
@click.option("--val-size", default="1000", show_default=True, callback=_size,
              help="Validation rows (a seeded random choice), or 'all'.")
@click.option("--max-accuracy-drop", default=1.0, show_default=True, type=float,
              help="Exit 1 (and write nothing) when accuracy drops by more points than this.")
@click.option("--adapter-precision", type=click.Choice(["int8", "fp16", "int4", "fp32"]), default=None,
              help="Lily LP/router/HP MatMuls: same as the model (default) or kept fp32. "
                   "The router softmax and mixing vector are always fp32.")
@click.option("--exclude-nodes", multiple=True, callback=_names, metavar="NAME,...",
              help="Nodes kept fp32 (names after inlining, e.g. node_linear_1 or node_hp_mix/mixed).")
@click.option("--exclude-op-types", multiple=True, callback=_names, metavar="TYPE,...",
              help="Op types kept fp32, e.g. Gemm.")
@click.option("--int8-target", type=click.Choice(["tensorrt", "onnxruntime"]), default=None,
              help="tensorrt: symmetric int8 activations (zero point 0), the form TensorRT builds; onnxruntime: "
                   "asymmetric uint8 activations, the form onnxruntime's x86 int8 kernels run fast (about 2x "
                   "fp32 on a VNNI CPU). Default: onnxruntime for a graph from export --optimize onnxruntime, "
                   "else tensorrt.")
@click.option("--min-sqnr", type=float, default=None, metavar="DB",
              help="--int8: keep fp32 every MatMul/Gemm whose input loses more than this to int8 on the "
                   "calibration rows (signal-to-quantization-noise ratio, dB). Default 18 for encoders; 0: off.")
@click.option("--no-keep-sensitive", is_flag=True,
              help="--fp16: convert softmax, reductions and layer norm to fp16 too (default: kept fp32).")
@click.option("--tokenizer", default=None, metavar="DIR",
              help="Tokenizer folder (or 'minilm') for text data (default: from --model or the ONNX metadata).")
@click.option("--model", "source_model", default=None, metavar="DIR",
              help="The adapter folder / deploy checkpoint the ONNX came from (its tokenizer is used).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Cache of tokenised calibration batches (default: ~/.cache/lily-deploy/calib).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the calibration cache.")
@click.option("--strict", is_flag=True, help="Fail when fewer calibration rows exist than --calib-size asks.")
@click.option("--keep-on-failure", is_flag=True, help="Write the file even when validation fails.")
@data_column_options
def command(onnx_file, output, precision, block_size, int4_target, int4_method, int4_embedding, new_tokens,
            min_token_agreement, max_ppl_increase, calib, calib_method, calib_size, seed, batch_size, max_length, val, val_size,
            max_accuracy_drop, adapter_precision, exclude_nodes, exclude_op_types, int8_target, min_sqnr,
            no_keep_sensitive, tokenizer,
            source_model, cache_dir, no_cache, strict, keep_on_failure, text_column, label_column):
    """Write an FP16, INT8 (Q/DQ) or (decoders) INT4 version of MODEL.onnx and validate it against MODEL.onnx.

    \b
    lily-deploy quantize model.onnx --int8 --calib train.tsv -o model.int8.onnx
    lily-deploy quantize model.onnx --fp16 --val dev.tsv -o model.fp16.onnx
    lily-deploy quantize llm.onnx --int4 --val prompts.jsonl -o llm.int4.onnx     # decoders

    A decoder (exported causal LM) takes the prompts JSONL of generate for --calib/--val and is
    judged by greedy-token agreement and perplexity against the fp32 decoder
    (--min-token-agreement, --max-ppl-increase).

    lily::HPMix nodes are inlined first (quantizers skip function nodes). The result is
    measured against MODEL.onnx on held-out rows (top-1 agreement, accuracy, logit
    differences) and written only when the accuracy drop is within --max-accuracy-drop.
    """
    import warnings

    from ..calib.readers import CalibrationWarning
    from ..core.errors import LilyDeployError
    from ..precision import QuantizeConfig, quantize

    if precision is None:
        raise click.UsageError("choose --int8 or --fp16 (or, for a decoder, --int4)")
    cache = {"cache_dir": None} if no_cache else ({"cache_dir": cache_dir} if cache_dir else {})
    config = make_config(QuantizeConfig, flags=FLAGS, model_path=onnx_file, output=output, precision=precision,
                         calib=calib, calib_method=calib_method, calib_size=calib_size, seed=seed,
                         batch_size=batch_size, max_length=max_length, val=val, val_size=val_size,
                         max_accuracy_drop=max_accuracy_drop, adapter_precision=adapter_precision,
                         exclude_nodes=exclude_nodes, exclude_op_types=exclude_op_types, int8_target=int8_target,
                         min_sqnr=min_sqnr, keep_sensitive=not no_keep_sensitive, tokenizer=tokenizer,
                         model=source_model, text_column=text_column, label_column=label_column, strict=strict,
                         keep_on_failure=keep_on_failure, block_size=block_size, int4_target=int4_target,
                         int4_method=int4_method, int4_embedding=int4_embedding, new_tokens=new_tokens,
                         min_token_agreement=min_token_agreement,
                         max_ppl_increase=max_ppl_increase, **cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        try:
            with usage_errors(FLAGS):
                result = quantize(config)
        finally:
            for w in caught:
                if issubclass(w.category, CalibrationWarning):
                    click.echo(f"warning: {w.message}", err=True)
    click.echo(result.table())
    if not result.passed:
        kept = f"; {output} written anyway (--keep-on-failure)" if result.written else f"; {output} not written"
        if hasattr(result.validation, "failures"):
            raise LilyDeployError(f"validation failed: {'; '.join(result.validation.failures)}{kept}")
        raise LilyDeployError(f"validation failed: {result.validation.metric} dropped "
                              f"{result.validation.drop:.2f} points, more than --max-accuracy-drop "
                              f"{max_accuracy_drop:g}{kept}")
    click.echo(f"wrote {output} ({result.seconds:.0f} s)")
