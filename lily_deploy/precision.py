"""``quantize``: FP16 and INT8 (Q/DQ) ONNX graphs, validated against the fp32 graph.

TensorRT 11 has no precision flags, so precision lives in the ONNX: FP16 as casts with fp32
inputs and outputs, INT8 as Q/DQ pairs from calibration on real data (symmetric, per-channel
weights: the form TensorRT accepts; ``calib/qdq.py``). The same graphs run on onnxruntime's
CPU, so every run ends by measuring them against the fp32 graph on held-out data (top-1
agreement, task accuracy, logit differences) and refuses to write a graph that loses more
accuracy than ``max_accuracy_drop`` allows.

Exported decoders (causal LMs, with or without a KV cache) go to
:mod:`lily_deploy.decoder_precision`: FP16, INT8 and INT4 weight-only, judged by generation
(greedy-token agreement and perplexity against the fp32 decoder). An encoder given ``fp16`` and
no data is validated on generated inputs, as ``export`` is.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .calib import qdq
from .calib.readers import CalibSet, default_cache_dir, load_calibration, onnx_input_specs, resolve_tokenizer

from .core.config import ConfigError, StageConfig, check_choice, check_number
from .core.errors import LilyDeployError
from .core.fileio import check_not_input, check_output_parent, sha256_file
from .runtime.onnx_io import load_onnx, metadata, set_metadata, staged_onnx
from .runtime.ort import OrtRunner

PRECISIONS = ("int8", "fp16", "int4")
BLOCK_SIZES = (16, 32, 64, 128, 256)
GENERATED_ROWS = 64  # fp16 without data: validated on this many generated inputs
DEFAULT_CALIB_SIZE = 256
DEFAULT_VAL_SIZE = 1000
DEFAULT_MAX_DROP = 1.0
DEFAULT_MIN_SQNR = 18.0  # dB; encoder int8 when min_sqnr is None (measured: benchmarks/precision_latency.py)
SQNR_KEY = "int8 input SQNR below --min-sqnr"
OUTPUT_NAME = "logits"


@dataclass
class Validation:
    """The quantized graph against the fp32 graph on the same inputs; truthy when within budget."""

    source: str
    rows: int
    precision: str
    agreement: float  # top-1 agreement, fraction
    max_abs: float
    mean_abs: float
    acc_fp32: Optional[float]  # task accuracy in percent (None without labels)
    acc_quant: Optional[float]
    max_drop: float

    @property
    def metric(self) -> str:
        return "accuracy" if self.acc_fp32 is not None else "top-1 disagreement"

    @property
    def drop(self) -> float:
        """Accuracy points lost; without labels, the share of rows whose top-1 changed (points)."""
        if self.acc_fp32 is not None:
            return self.acc_fp32 - self.acc_quant
        return 100.0 * (1.0 - self.agreement)

    def __bool__(self) -> bool:
        return self.drop <= self.max_drop + 1e-9

    def lines(self) -> list[str]:
        out = [f"validation against fp32 on {self.source}:"]
        if self.acc_fp32 is not None:
            out.append(f"  accuracy  fp32 {self.acc_fp32:.2f}%  {self.precision} {self.acc_quant:.2f}%  "
                       f"drop {self.drop:+.2f} points (max {self.max_drop:.2f})")
        else:
            out.append(f"  no labels: top-1 disagreement {self.drop:.2f} points (max {self.max_drop:.2f})")
        out.append(f"  top-1 agreement {100 * self.agreement:.2f}%  {OUTPUT_NAME} max abs diff {self.max_abs:.3e}  "
                   f"mean abs diff {self.mean_abs:.3e}")
        out.append("PASSED" if self else f"FAILED: {self.metric} drop {self.drop:.2f} > {self.max_drop:.2f} points")
        return out

    def to_json(self) -> dict:
        return {"data": self.source, "rows": self.rows, "top1_agreement": round(self.agreement, 6),
                "max_abs": self.max_abs, "mean_abs": self.mean_abs, "accuracy_fp32": self.acc_fp32,
                "accuracy": self.acc_quant, "drop_points": round(self.drop, 4), "max_drop_points": self.max_drop,
                "passed": bool(self)}


@dataclass
class QuantizeResult:
    path: Path
    precision: str
    adapter_precision: str
    adapter_layers: int
    method: Optional[str] = None
    calib: Optional[str] = None
    calib_rows: int = 0
    kept_fp32: dict = field(default_factory=dict)  # reason -> node names
    int8_matmuls: int = 0
    sqnr: dict = field(default_factory=dict)  # int8 MatMul -> SQNR (dB) of its activation inputs, first pass
    min_sqnr: Optional[float] = None
    int8_target: str = "tensorrt"
    validation: Optional[Validation] = None  # a DecoderValidation for decoders
    written: bool = False
    notes: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)  # decoders: what was converted (replaces the encoder lines)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.validation is None or bool(self.validation)

    def table(self) -> str:
        lines = list(self.summary)
        if self.summary:
            pass
        elif self.precision == "int8":
            form = ("symmetric int8 activations (for TensorRT)" if self.int8_target == "tensorrt" else
                    "asymmetric uint8 activations (for onnxruntime on x86; TensorRT rejects it)")
            lines.append(f"int8 Q/DQ: {form}, per-channel int8 weights, float biases; "
                         f"{self.method} calibration on {self.calib_rows} rows of {self.calib}")
            lines.append(f"  {self.int8_matmuls} MatMul/Gemm nodes run int8")
            if self.sqnr:
                worst = sorted(self.sqnr.items(), key=lambda kv: kv[1])[:5]
                lines.append("  lossiest int8 inputs (SQNR on the calibration rows): "
                             + ", ".join(f"{n} {db:.1f} dB" for n, db in worst))
                if self.min_sqnr:
                    lines.append(f"  --min-sqnr {self.min_sqnr:g} dB: {len(self.kept_fp32.get(SQNR_KEY, []))} "
                                 "MatMul/Gemm kept fp32 (--min-sqnr 0: none)")
        else:
            lines.append("fp16: fp16 weights and activations, fp32 inputs and outputs")
        if self.adapter_layers and not self.summary:
            adapter = {"int8": "int8 (LP, router, h @ B~ MatMuls)", "fp16": "fp16 (LP, router, h @ B~)",
                       "fp32": "fp32 (LP, router, h @ B~)"}[self.adapter_precision]
            lines.append(f"  lily::HPMix: {self.adapter_layers} layers inlined; adapter {adapter}; "
                         "router softmax and mixing vector fp32")
        kept = ", ".join(f"{reason} {len(names)}" for reason, names in self.kept_fp32.items())
        if kept:
            lines.append(f"  kept fp32: {kept} nodes (every name in metadata lily_deploy.excluded_nodes)")
        sensitive = self.kept_fp32.get("numerically sensitive ops")
        if sensitive:
            lines.append(f"    sensitive ops kept fp32: {_abbrev(sensitive)}")
        user = self.kept_fp32.get("--exclude-nodes/--exclude-op-types")
        if user:
            lines.append(f"    excluded by you: {_abbrev(user)}")
        for n in self.notes:
            lines.append(f"note: {n}")
        if self.validation is not None:
            lines += self.validation.lines()
        return "\n".join(lines)


def _abbrev(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _labels_from_meta(meta: dict) -> Optional[list[str]]:
    raw = meta.get("lily_deploy.labels")
    if not raw:
        return None
    try:
        labels = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return [str(l) for l in labels] if isinstance(labels, list) and labels else None


def validate(reference: Path, candidate: Path, data: CalibSet, precision: str, labels: Optional[list[str]],
             max_drop: float, source: str, progress: bool = True) -> Validation:
    """Run both graphs on ``data`` and compare logits, top-1 and (with labels) accuracy."""
    import numpy as np

    ref_s, cand_s = OrtRunner(reference), OrtRunner(candidate)
    out_name = OUTPUT_NAME if OUTPUT_NAME in ref_s.output_names else ref_s.output_names[0]
    bar = None
    if progress and len(data) >= 64:
        try:
            import sys

            from tqdm import tqdm

            bar = tqdm(total=len(data), desc="validating", unit="row", leave=False, file=sys.stderr)
        except ImportError:
            bar = None
    refs, cands = [], []
    try:
        for batch in data.batches:
            r = ref_s.infer(batch, [out_name])[out_name].astype(np.float64)
            c = cand_s.infer(batch, [out_name])[out_name].astype(np.float64)
            refs.append(r.reshape(-1, r.shape[-1]))
            cands.append(c.reshape(-1, c.shape[-1]))
            if bar is not None:
                bar.update(next(iter(batch.values())).shape[0])
    finally:
        if bar is not None:
            bar.close()
    ref, cand = np.concatenate(refs), np.concatenate(cands)
    if not np.isfinite(cand).all():
        bad = int(np.argmax(~np.isfinite(cand).all(axis=1)))
        raise LilyDeployError(f"the {precision} graph gives non-finite {out_name} on {source}, row {data.rows[bad] + 1}: "
                              "exclude the overflowing nodes (exclude_nodes / exclude_op_types)")
    diff = np.abs(cand - ref)
    agreement = float((cand.argmax(-1) == ref.argmax(-1)).mean())
    acc_ref = acc_q = None
    if data.labels is not None and ref.shape[0] == len(data.labels):
        from .core.data import model_label_map

        label_map = model_label_map(labels, num_labels=ref.shape[-1])
        unknown = sorted({l for l in data.labels if l not in label_map.index})
        if unknown:
            raise LilyDeployError(f"{data.source}: label {unknown[0]!r} is not one the model knows "
                                  f"(labels: {', '.join(label_map.labels)})")
        y = np.asarray([label_map.index[l] for l in data.labels])
        acc_ref = 100.0 * float((ref.argmax(-1) == y).mean())
        acc_q = 100.0 * float((cand.argmax(-1) == y).mean())
    return Validation(source, ref.shape[0], precision, agreement, float(diff.max()), float(diff.mean()),
                      acc_ref, acc_q, max_drop)


@dataclass(frozen=True)
class QuantizeConfig(StageConfig):
    """What :func:`quantize` writes and how; the fields are its keyword parameters.

    ``calib`` (required for int8) gives the calibration rows; validation uses ``val`` or, by
    default, rows of ``calib`` that calibration did not use (``calib_size``/``val_size`` None:
    every row). The file is written only when the accuracy drop is within
    ``max_accuracy_drop`` points (or with ``keep_on_failure``). ``adapter_precision`` (None:
    ``precision``) says whether the adapter's LP/router/HP MatMuls follow the model or stay
    fp32. ``min_sqnr`` (int8): MatMul/Gemm nodes whose activation input loses more than this
    to int8 on the calibration rows (signal-to-quantization-noise ratio in dB) are
    re-quantized as fp32; None is :data:`DEFAULT_MIN_SQNR` for an encoder, 0 turns it off.
    ``int8_target``: "tensorrt" (symmetric int8 activations, what TensorRT builds) or
    "onnxruntime" (asymmetric uint8 activations, what onnxruntime's x86 int8 kernels run fast;
    TensorRT rejects it); None is "onnxruntime" for a graph fused by ``export --optimize
    onnxruntime`` (no TensorRT can take it) and "tensorrt" otherwise. ``cache_dir``: the calibration cache (default
    ``~/.cache/lily-deploy/calib``), or None for none.
    """

    model_path: str | os.PathLike
    output: str | os.PathLike
    precision: str = "int8"
    calib: Optional[str | os.PathLike] = None
    calib_method: str = "minmax"
    calib_size: Optional[int] = DEFAULT_CALIB_SIZE
    seed: int = 0
    batch_size: int = 16
    max_length: int = 128
    val: Optional[str | os.PathLike] = None
    val_size: Optional[int] = DEFAULT_VAL_SIZE
    max_accuracy_drop: float = DEFAULT_MAX_DROP
    adapter_precision: Optional[str] = None
    exclude_nodes: Sequence[str] = ()
    exclude_op_types: Sequence[str] = ()
    keep_sensitive: bool = True
    min_sqnr: Optional[float] = None
    int8_target: Optional[str] = None
    tokenizer: Optional[str] = None
    model: Optional[str] = None
    text_column: Optional[str] = None
    label_column: Optional[str] = None
    cache_dir: Optional[str | os.PathLike] = field(default_factory=default_cache_dir)
    strict: bool = False
    keep_on_failure: bool = False
    progress: bool = True
    block_size: int = 32
    int4_target: str = "onnxruntime"
    int4_method: str = "rtn"
    int4_embedding: bool = False
    new_tokens: int = 16
    min_token_agreement: float = 90.0
    max_ppl_increase: float = 5.0

    def __post_init__(self) -> None:
        for name in ("exclude_nodes", "exclude_op_types"):  # a lone string is one name, not its letters
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value or ()))
        super().__post_init__()

    def validate(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("adapter_precision", self.adapter_precision, (self.precision, "fp32"), allow_none=True)
        self._validate_decoder_fields()
        check_choice("calib_method", self.calib_method, qdq.CALIB_METHODS)
        check_choice("int8_target", self.int8_target, qdq.INT8_TARGETS, allow_none=True)
        for name in ("calib_size", "val_size"):
            check_number(name, getattr(self, name), minimum=1, integer=True, allow_none=True)
        check_number("seed", self.seed, integer=True)
        check_number("batch_size", self.batch_size, minimum=1, integer=True)
        check_number("max_length", self.max_length, minimum=1, integer=True)
        check_number("max_accuracy_drop", self.max_accuracy_drop, minimum=0)
        check_number("min_sqnr", self.min_sqnr, minimum=0, allow_none=True)
        if self.min_sqnr is not None and self.precision != "int8":
            raise ConfigError("min_sqnr", "is for int8 (fp16 keeps sensitive ops fp32 by op type)")
        if self.precision == "int8" and self.calib is None:
            raise ConfigError("calib", "int8 needs calibration data (TSV/CSV/JSONL, image folder or .npz)")
        if self.precision == "int8" and self.calib is None and self.val is None:
            raise ConfigError("val", f"{self.precision} ends with a validation: give validation data "
                                     "(or calibration data, whose unused rows are held out)")

    def _validate_decoder_fields(self) -> None:
        from .decoder_precision import INT4_METHODS, INT4_TARGETS

        check_choice("block_size", self.block_size, BLOCK_SIZES)
        check_choice("int4_target", self.int4_target, INT4_TARGETS)
        check_choice("int4_method", self.int4_method, INT4_METHODS)
        if self.precision == "int4" and self.int4_target == "tensorrt" and self.int4_method != "rtn":
            raise ConfigError("int4_method", f"{self.int4_method} writes onnxruntime's MatMulNBits only; the "
                                             "tensorrt target takes rtn (blockwise INT4 DequantizeLinear)")
        if self.int4_embedding and (self.precision != "int4" or self.int4_target != "onnxruntime"
                                    or self.int4_method != "rtn"):
            raise ConfigError("int4_embedding", "is for int4 with the onnxruntime target and rtn "
                                                "(onnxruntime's GatherBlockQuantized)")
        check_number("new_tokens", self.new_tokens, minimum=1, integer=True)
        check_number("min_token_agreement", self.min_token_agreement, minimum=0, maximum=100)
        check_number("max_ppl_increase", self.max_ppl_increase, minimum=0)

    @property
    def adapter(self) -> str:
        """The adapter MatMuls' precision: ``adapter_precision``, or the model's."""
        return self.adapter_precision or self.precision


def quantize(config: Optional[QuantizeConfig] = None, /, **fields) -> QuantizeResult:
    """Write an ``int8`` (Q/DQ) or ``fp16`` version of ``model_path`` to ``output``, validated.

    The fields are :class:`QuantizeConfig`'s. The result carries the validation whether or not
    the file was written.
    """
    config = QuantizeConfig.resolve(config, **fields)
    started = time.perf_counter()
    model_path, output = Path(config.model_path), Path(config.output)
    _check_output(config, model_path, output)
    source, meta = _load_source(model_path)
    from .decoder_precision import is_decoder, quantize_decoder

    decoder = is_decoder(source, meta)
    config = _concrete_defaults(config, source, meta, model_path, decoder)
    if decoder:
        result = QuantizeResult(output, config.precision, config.adapter, 0, int8_target=config.int8_target,
                                method=config.calib_method if config.precision == "int8" else None)
        quantize_decoder(config, source, meta, result)
        result.seconds = time.perf_counter() - started
        return result
    if config.precision == "int4":
        raise LilyDeployError(f"{model_path}: --int4 (weight-only) is for decoders, whose speed is bound by reading "
                              "weights; an encoder is compute-bound: quantize it with --int8 or --fp16")
    inlined, sites = qdq.inline_functions(source)
    user = qdq.resolve_exclusions(inlined, config.exclude_nodes, config.exclude_op_types)
    if config.precision == "int8":
        plan = qdq.int8_plan(inlined, sites, config.adapter, user)
    else:
        plan = qdq.fp16_plan(inlined, sites, config.adapter, user, keep_sensitive=config.keep_sensitive)
    result = QuantizeResult(output, config.precision, config.adapter, len(sites),
                            method=config.calib_method if config.precision == "int8" else None,
                            int8_target=config.int8_target, kept_fp32=plan.kept_fp32)
    calib_set, val_set, val_source = _data_sets(config, onnx_input_specs(source), meta, result)

    with staged_onnx(output) as staged:
        if config.precision == "int8":
            converted = _convert_int8(config, inlined, plan, calib_set, staged.folder, result)
        else:
            converted = qdq.convert_fp16(inlined, plan)
        qdq.strip_custom_domain(converted)
        info = _quantization_info(config, model_path, sites, plan, calib_set, result)
        new_meta = {**meta, "lily_deploy.precision": config.precision, "lily_deploy.quantization": info,
                    "lily_deploy.excluded_nodes": plan.excluded()}
        set_metadata(converted, new_meta)
        staged.write(converted)
        result.validation = validate(model_path, staged.path, val_set, config.precision, _labels_from_meta(meta),
                                     config.max_accuracy_drop, val_source, config.progress)
        info["validation"] = result.validation.to_json()
        set_metadata(converted, {**new_meta, "lily_deploy.quantization": info})
        staged.write(converted)
        if result.passed or config.keep_on_failure:
            staged.commit()
            result.written = True
    result.seconds = time.perf_counter() - started
    return result


def _concrete_defaults(config: QuantizeConfig, source, meta: dict, model_path: Path, decoder: bool) -> QuantizeConfig:
    """The model-dependent defaults made concrete: the int8 target from the graph, the SQNR floor for encoders."""
    from .graph_optimize import META_KEY, ORT_DOMAIN

    fused = META_KEY in meta or any(n.domain == ORT_DOMAIN for n in source.graph.node)
    if fused and config.precision == "int8" and config.int8_target == "tensorrt":
        raise LilyDeployError(f"{model_path}: fused for onnxruntime (export --optimize onnxruntime), which TensorRT "
                              "never takes; --int8-target tensorrt needs the graph of a plain export")
    changes = {}
    if config.int8_target is None:
        changes["int8_target"] = "onnxruntime" if fused else "tensorrt"
    if config.min_sqnr is None and config.precision == "int8" and not decoder:
        changes["min_sqnr"] = DEFAULT_MIN_SQNR
    return config.replace(**changes) if changes else config


def _check_output(config: QuantizeConfig, model_path: Path, output: Path) -> None:
    """Refuse, before any work, an output that cannot be written or would overwrite an input."""
    check_output_parent(output, "-o")
    check_not_input(output, {"ONNX model": model_path, "calibration data": config.calib,
                             "validation data": config.val}, "-o")
    if output.is_dir():
        raise LilyDeployError(f"-o {output}: is a folder; give the ONNX file's path")


def _load_source(model_path: Path):
    """The fp32 graph (weights loaded) and its metadata; an already quantized graph is refused."""
    source = load_onnx(model_path, external_data=True)
    reason = qdq.quantized_reason(source)
    if reason:
        raise LilyDeployError(f"{model_path} is already quantized: {reason}; quantize the fp32 export instead")
    return source, metadata(source)


def _data_sets(config: QuantizeConfig, specs, meta: dict, result: QuantizeResult):
    """The calibration set (int8), the validation set and a phrase naming the validation rows.

    Validation uses ``val`` when given, else the rows of ``calib`` calibration did not use (or,
    with a note, the calibration rows themselves when none is left).
    """
    tok_cache = {}

    def get_tokenizer():  # resolved once, and only for text data
        if "t" not in tok_cache:
            tok_cache["t"] = resolve_tokenizer(config.tokenizer, config.model, meta.get("lily_deploy.base_model"),
                                               str(config.model_path))
        return tok_cache["t"]

    common = dict(specs=specs, seed=config.seed, batch_size=config.batch_size, max_length=config.max_length,
                  text_column=config.text_column, label_column=config.label_column, cache_dir=config.cache_dir,
                  progress=config.progress, tokenizer=get_tokenizer)
    calib, calib_set = config.calib, None
    if config.precision == "int8":
        calib_set = load_calibration(calib, size=config.calib_size, strict=config.strict, flag="--calib",
                                     uniform_length=config.calib_method != "minmax", **common)
        result.calib, result.calib_rows = Path(calib).name, len(calib_set)
    if config.val is None and calib is None:
        return None, *_generated_set(config, specs, common, result)
    if config.val is not None:
        val_set = load_calibration(config.val, size=config.val_size, strict=False, flag="--val", warn_short=False,
                                   **common)
        return calib_set, val_set, f"{len(val_set)} rows of {Path(config.val).name}"
    used = calib_set.rows if calib_set is not None else []
    if calib_set is not None and len(used) >= calib_set.total_rows:
        msg = (f"--calib {calib}: every row went to calibration, none is left for validation; "
               "give separate validation data (val) for a held-out measure")
        if config.strict:
            raise LilyDeployError(f"{msg} (strict)")
        result.notes.append(msg + "; validated on the calibration rows")
        return calib_set, calib_set, f"the {len(calib_set)} calibration rows of {Path(calib).name}"
    val_set = load_calibration(calib, size=config.val_size, strict=False, flag="--calib", exclude_rows=used,
                               warn_short=False, **common)
    kind = "held-out " if used else ""
    return calib_set, val_set, f"{len(val_set)} {kind}rows of {Path(calib).name}"


def _generated_set(config: QuantizeConfig, specs, common: dict, result: QuantizeResult):
    """``fp16`` without data: validate, as ``export`` does, on generated inputs (seeded review sentences
    for text models, seeded uniform values for the others), and say so."""
    import random
    import tempfile

    import numpy as np

    from .datasets import review

    folder = Path(tempfile.mkdtemp(prefix="lily-generated-"))
    try:
        if any(s.name == "input_ids" for s in specs):
            rng = random.Random(config.seed)
            path, what = folder / "generated.jsonl", f"{GENERATED_ROWS} generated inputs (seeded review sentences)"
            path.write_text("".join(json.dumps({"text": review(rng)[0]}) + "\n" for _ in range(GENERATED_ROWS)))
        else:
            gen, arrays = np.random.default_rng(config.seed), {}
            for s in specs:  # dynamic axes: the rows, then 224 for images and 16 otherwise
                fill = 224 if s.name == "pixel_values" else 16
                shape = [GENERATED_ROWS] + [d if isinstance(d, int) else fill for d in list(s.shape)[1:]]
                floating = np.issubdtype(np.dtype(s.dtype), np.floating)
                arrays[s.name] = gen.uniform(-1, 1, shape).astype(s.dtype) if floating else np.zeros(shape, s.dtype)
            path, what = folder / "generated.npz", f"{GENERATED_ROWS} generated inputs (seeded uniform values)"
            np.savez(path, **arrays)
        data = load_calibration(path, size=None, strict=False, flag="--val", warn_short=False,
                                **{**common, "cache_dir": None, "text_column": "text", "label_column": None})
    finally:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    result.notes.append(f"no --val given: validated on {what}; give --val for a measure on your data")
    return data, what


def _convert_int8(config: QuantizeConfig, inlined, plan: qdq.Plan, calib_set: CalibSet, folder: Path,
                  result: QuantizeResult):
    """Calibrate and insert Q/DQ; with ``min_sqnr``, a second pass on the same calibrated ranges
    leaves fp32 the MatMul/Gemm nodes whose inputs lost too much to int8 in the first."""
    raw, ranges = folder / "quantized.onnx", folder / "ranges.json"
    qdq.quantize_int8(inlined, calib_set.reader(), config.calib_method, plan, str(raw), str(ranges),
                      config.int8_target)
    converted = load_onnx(raw, external_data=True)
    result.sqnr = qdq.activation_sqnr(inlined, converted, calib_set.batches)
    result.min_sqnr = config.min_sqnr
    lossy = sorted(n for n, db in result.sqnr.items() if config.min_sqnr and db < config.min_sqnr)
    if lossy:
        plan.kept_fp32[SQNR_KEY] = lossy
        qdq.quantize_int8(inlined, None, config.calib_method, plan, str(raw), str(ranges), config.int8_target)
        converted = load_onnx(raw, external_data=True)
    result.int8_matmuls = len(qdq.count_quantized(converted)["int8_matmuls"])
    if not result.int8_matmuls:
        raise LilyDeployError("quantization produced no int8 MatMul/Gemm; check exclude_nodes/exclude_op_types")
    raw.unlink()
    return converted


def _quantization_info(config: QuantizeConfig, model_path: Path, sites, plan: qdq.Plan,
                       calib_set: Optional[CalibSet], result: QuantizeResult) -> dict:
    """The ``lily_deploy.quantization`` metadata: what was converted, kept fp32 and calibrated on."""
    info = {
        "precision": config.precision,
        "format": "QDQ" if config.precision == "int8" else "casts",
        "adapter_precision": config.adapter,
        "adapter_layers": [{"node": s.hpmix, "layer": s.layer, "lp": s.lp, "router": s.router,
                            "hp_matmuls": s.hp_matmuls} for s in sites],
        "kept_fp32": {k: len(v) for k, v in plan.kept_fp32.items()},
        "source_onnx_sha256": sha256_file(model_path),
    }
    if config.precision == "int8":
        info.update({"target": config.int8_target, "activations": qdq.ACTIVATION_FORM[config.int8_target],
                     "weights": "int8 symmetric per-channel",
                     "bias": "float", "calib_method": config.calib_method, "calib_data": str(Path(config.calib).name),
                     "calib_rows": len(calib_set), "calib_seed": config.seed, "int8_matmuls": result.int8_matmuls,
                     "min_sqnr_db": config.min_sqnr, "input_sqnr_db": result.sqnr})
    return info
