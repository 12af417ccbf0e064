"""``lily-deploy export``."""
import click

from .options import base_option, make_config, parse_tolerances, usage_errors

# ExportConfig field -> flag, where the flag is not --field-name
FLAGS = {"source": "MODEL", "output": "-o", "validation": "--no-validate", "inputs_npz": "--inputs",
         "cache": "--no-cache"}


@click.command("export")
@click.argument("model", type=str)
@click.option("-o", "--output", required=True, type=click.Path(),
              help="ONNX file to write, or DIR/: a folder with model.onnx, config.json and the tokenizer "
                   "(the layout Optimum's ORTModelFor* classes load).")
@click.option("--routing", type=click.Choice(["batch", "sample", "token", "prompt", "causal"]), default=None,
              help="Routing of dynamic layers. Encoders: batch, sample (default: batch- and padding-invariant) or "
                   "token. Decoders: prompt, causal or token, exact under a KV cache (default: as trained).")
@click.option("--ops", type=click.Choice(["custom", "standard"]), default="custom", show_default=True,
              help="custom: lily::HPMix nodes with function bodies; standard: the bodies inlined.")
@click.option("--opset", type=int, default=20, show_default=True, help="ONNX opset (18 or newer).")
@click.option("--dynamic", default="batch,sequence", show_default=True, help="Dynamic axes of the inputs.")
@click.option("--external-data", is_flag=True, help="Write weights to OUTPUT.data beside the model.")
@click.option("--task", type=click.Choice(["seq-cls", "image-cls", "causal-lm"]), default=None,
              help="Expected task (checked against the model).")
@click.option("--no-validate", is_flag=True, help="Skip the onnxruntime-vs-torch validation (not recommended).")
@click.option("--atol", multiple=True, help="Tolerance, e.g. 1e-4 or logits:1e-4 (repeatable).")
@click.option("--data", type=click.Path(), default=None, help="Validate on texts from this data file.")
@click.option("--inputs", "inputs_npz", type=click.Path(), default=None,
              help="Validate on these inputs (.npz with one array per model input).")
@click.option("--text-column", default=None, help="Text column of --data.")
@click.option("--keep-on-failure", is_flag=True, help="Write the file even when validation fails.")
@click.option("--no-cache", is_flag=True, help="Decoders: a plain logits graph without the KV cache.")
@click.option("--allow-inconsistent-routing", is_flag=True,
              help="Decoders: export batch or sample routing with a cache anyway (for comparison only).")
@click.option("--switchable", is_flag=True,
              help="Encoders: the Lily LPs, routers, HP pools and head as graph inputs (this adapter's values as "
                   "defaults), so one graph runs any adapter packed for it with 'lily-deploy adapter pack'.")
@click.option("--optimize", type=click.Choice(["none", "onnxruntime"]), default="none", show_default=True,
              help="onnxruntime: fuse attention, SkipLayerNorm and BiasGelu into onnxruntime's own ops (com.microsoft; "
                   "for onnxruntime only, build-trt refuses it), the Lily terms added to the fused projections.")
@base_option
def command(model, output, routing, ops, opset, dynamic, external_data, task, no_validate, atol, data,
            inputs_npz, text_column, keep_on_failure, no_cache, allow_inconsistent_routing, switchable, optimize,
            base):
    """Export MODEL (adapter folder, deploy checkpoint, or base model) to ONNX and validate it.

    \b
    Encoders:  input_ids, attention_mask[, token_type_ids]  (int64, [batch, sequence])
               or pixel_values (float, [batch, 3, H, W])  ->  logits
    Decoders:  input_ids, attention_mask, position_ids, past_key_values.N.key/value,
               past_routing.N  ->  logits, present.N.key/value, present_routing.N
               (one graph for prefill and decode; validated by greedy generation vs torch)
    """
    from ..core.errors import LilyDeployError
    from ..hf_folder import export_folder, is_folder_output
    from ..onnx_export import ExportConfig, export_onnx

    config = make_config(ExportConfig, flags=FLAGS, source=model, output=output, routing=routing, ops=ops,
                         opset=opset, dynamic=dynamic, external_data=external_data, task=task,
                         validation=not no_validate, atol=parse_tolerances(atol, "--atol"), data=data,
                         inputs_npz=inputs_npz, keep_on_failure=keep_on_failure, base=base, text_column=text_column,
                         cache=not no_cache, allow_inconsistent_routing=allow_inconsistent_routing,
                         switchable=switchable, optimize=optimize)
    with usage_errors(FLAGS):
        result = (export_folder if is_folder_output(output) else export_onnx)(config)
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"{result.dynamic_layers} dynamic Lily layers ({result.routing} routing, {result.ops} ops), "
               f"{result.folded_layers} folded")
    if result.comparisons:
        click.echo(result.table())
    if not result.passed:
        kept = f"; {output} written anyway (--keep-on-failure)" if keep_on_failure else f"; {output} not written"
        raise LilyDeployError(f"validation failed: onnxruntime differs from torch beyond tolerance{kept}")
    click.echo(f"wrote {output}" + (f" ({result.path.name}, config.json, tokenizer)" if is_folder_output(output)
                                      else ""))
