"""``lily-deploy build-trt``: a thin layer over :func:`lily_deploy.trt_build.build_engine`."""
import json

import click

from .options import make_config, usage_errors

# config fields whose flag is not --field-name
FLAGS = {"onnx_path": "MODEL.onnx", "compute_capabilities": "--compute-capability"}


@click.command("build-trt")
@click.argument("onnx_file", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, metavar="ENGINE",
              help="Engine file to write (default: MODEL.plan beside the ONNX); the report goes to ENGINE.json.")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]), default="auto", show_default=True,
              help="auto: TensorRT when a GPU is visible, else TensorRT-RTX (which builds without a GPU).")
@click.option("--shapes", multiple=True, metavar="NAME:DIMS,...",
              help="A fixed profile, e.g. input_ids:1x128 (repeat for several profiles).")
@click.option("--min-shapes", multiple=True, metavar="NAME:DIMS,...", help="Profile minimum shapes (repeat per profile).")
@click.option("--opt-shapes", multiple=True, metavar="NAME:DIMS,...", help="Profile optimum shapes (repeat per profile).")
@click.option("--max-shapes", multiple=True, metavar="NAME:DIMS,...", help="Profile maximum shapes (repeat per profile).")
@click.option("--workspace", default=None, metavar="SIZE",
              help="Workspace pool limit, e.g. 2GiB, 512MiB (at least 1MiB; default: the backend's).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file: read when present, written after the build.")
@click.option("--compute-capability", "compute_capabilities", multiple=True, metavar="SMxy",
              help="TensorRT-RTX target (sm75 sm80 sm86 sm89 sm120 sm121 or current); repeat for several. "
                   "Default: the GPU here, else sm89.")
@click.option("--plugin-route", is_flag=True,
              help="Serve lily::HPMix nodes by the registered plugin instead of inlining their function bodies.")
@click.option("--fp16", is_flag=True, help="TensorRT 10 only: legacy FP16 builder flag (weakly typed network).")
@click.option("--int8", is_flag=True, help="TensorRT 10 only: legacy INT8 builder flag (for Q/DQ graphs).")
@click.option("--verbose", is_flag=True, help="Show TensorRT's log.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
def command(onnx_file, output, backend, shapes, min_shapes, opt_shapes, max_shapes, workspace, timing_cache,
            compute_capabilities, plugin_route, fp16, int8, verbose, as_json):
    """Build a TensorRT or TensorRT-for-RTX engine from MODEL.onnx.

    \b
    Profiles default from the ONNX's dynamic axes: batch 1..32, sequence 1..512, opt at the
    middle. Precision comes from the graph (FP16 casts, INT8 Q/DQ): networks are strongly typed.
    Writes the engine and ENGINE.json (backend, targets, profiles, I/O, precision, build time).
    """
    from ..trt_build import BuildConfig, build_engine

    config = make_config(BuildConfig, flags=FLAGS, onnx_path=onnx_file, output=output, backend=backend,
                         shapes=shapes, min_shapes=min_shapes, opt_shapes=opt_shapes, max_shapes=max_shapes,
                         workspace=workspace, timing_cache=timing_cache, compute_capabilities=compute_capabilities,
                         plugin_route=plugin_route, fp16=fp16, int8=int8, verbose=verbose)
    with usage_errors(FLAGS):
        report = build_engine(config)
    click.echo(json.dumps(report.data, indent=2) if as_json else report.table())
