"""``parity``: is the deployed model the model that was trained?

The torch reference (an adapter folder, a deploy checkpoint or a base model) and every
candidate (ONNX files on onnxruntime, TensorRT engines on a GPU, other checkpoints in torch)
run on the same inputs -- real rows of a data file, or seeded generated inputs -- in the same
batches. Per candidate the report gives the task metric and its delta to the reference, top-1
agreement, max / mean / p99 absolute difference and cosine similarity per output, and batch
invariance (each sample alone vs inside one mixed, padded batch), each judged against
tolerances that depend on the candidate's precision:

======  ===================================  ===============  ================  ================
 prec    abs diff (stat ``max``)              top-1 agreement  metric drop       invariance atol
======  ===================================  ===============  ================  ================
 fp32    logits <= 1e-4                       100 %            0 points          1e-4
 fp16    reported, not judged                 >= 99 %          <= 0.5 points     1e-2
 bf16    reported, not judged                 >= 98 %          <= 1.0 point      5e-2
 int8    reported, not judged                 >= 95 %          <= 1.0 point      5e-2
======  ===================================  ===============  ================  ================

For fp16 and int8 the task metric is the judge; the agreement floor guards against a broken
graph. It is 95 % for int8 because near-tie samples flip both ways: MiniLM+Lily on SST-2 (80 %
accurate) quantized to Q/DQ INT8 measured 95.6-96.3 % agreement on 1,000 dev rows with an
accuracy change of -0.3 to +0.4 points.

A candidate's precision is its ONNX metadata ``lily_deploy.precision`` if present, else read off
the graph (Q/DQ nodes: int8; fp16 initializers or casts: fp16), else an engine's build report.
Its routing is its metadata ``lily_deploy.routing``; the reference runs in that routing for
that candidate. Batch invariance must hold for ``sample`` and ``token`` routing and for plain
(folded) models; for ``batch`` routing -- PEFT's, one mixing vector over the whole padded
batch -- it is reported as a finding, not a failure. An engine where no GPU is visible is
SKIPPED with the reason, not failed -- but a file that is not a TensorRT engine at all is an
error, and a run that compared nothing does not pass (``allow_skips`` accepts it, and still
says NOTHING COMPARED). Results are objects that are truthy when they pass.

When the reference is a causal LM, parity is generation parity (:mod:`lily_deploy.generation_parity`):
greedy tokens and per-step logits of every candidate against the reference, alone and in
left-padded batches, plus cache consistency, for ``max_new_tokens`` tokens per prompt.

One :class:`ParityConfig` describes the run::

    run_parity(reference="out/adapter", candidates=["lily.onnx", "lily.int8.onnx"], data="dev.tsv")
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .core.config import ConfigError, StageConfig, check_choice, check_number
from .core.errors import LilyDeployError
from .core.modes import DYNAMIC_MODES, STATE_MODES
from .core.config import as_tuple
from .runtime.decoder import single_routing
from .runtime.onnx_io import onnx_vocab
from .runtime.torch_runner import routing_drift
from .runtime.tensorrt import check_engine_header
from .runtime import ENGINE_SUFFIXES, Runner, cuda_available
from .runtime.onnx_io import metadata_value

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
METRICS = ("accuracy", "f1", "mcc", "agreement")
LABELLED_METRICS = ("accuracy", "f1", "mcc")
STATS = ("max", "mean", "p99")
DEFAULT_BATCH_SIZES = (1, 8)
INVARIANCE_REQUIRED = ("sample", "token", "none")
QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv", "MatMulInteger",
             "ConvInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat", "QGemm")
SCHEMA = 1


# --------------------------------------------------------------------------- tolerances

@dataclass
class Tolerance:
    """What a candidate of one precision must meet; ``atol`` maps output names (or ``*``) to limits."""

    atol: dict[str, float]
    min_agreement: float  # percent
    max_metric_drop: float  # percentage points
    invariance_atol: float
    stat: str = "max"  # statistic of |candidate - reference| held to atol: max, mean or p99

    def atol_for(self, output: str) -> Optional[float]:
        return self.atol.get(output, self.atol.get("*"))


DEFAULT_TOLERANCES = {
    "fp32": Tolerance({"*": 1e-4}, 100.0, 0.0, 1e-4),
    "fp16": Tolerance({}, 99.0, 0.5, 1e-2),
    "bf16": Tolerance({}, 98.0, 1.0, 5e-2),
    "int8": Tolerance({}, 95.0, 1.0, 5e-2),
}


def _split_key(key: str, name: str, allow_output: bool) -> tuple[Optional[str], Optional[str]]:
    """``*`` / ``int8`` / ``logits`` / ``int8:logits`` -> (precision or None, output or None)."""
    if key == "*":
        return None, None
    head, _, tail = key.partition(":")
    if tail:
        if head not in PRECISIONS:
            raise ConfigError(name, f"{key}: {head!r} is not a precision ({', '.join(PRECISIONS)})")
        if not allow_output:
            raise ConfigError(name, f"{key}: expected VALUE or PRECISION:VALUE")
        return head, tail
    if key in PRECISIONS:
        return key, None
    if not allow_output:
        raise ConfigError(name, f"{key}: {key!r} is not a precision ({', '.join(PRECISIONS)})")
    return None, key


def _most_specific_last(pairs, name: str, allow_output: bool) -> list:
    """``(key, value)`` pairs as ``((precision, output), value)``, generic first so the most specific wins."""
    items = [(_split_key(k, name, allow_output), v) for k, v in pairs]
    return sorted(items, key=lambda kv: (kv[0][0] is not None, kv[0][1] is not None))


def make_tolerances(atol: Optional[dict] = None, min_agreement: Optional[dict] = None,
                    max_metric_drop: Optional[dict] = None, invariance_atol: Optional[dict] = None,
                    stat: str = "max") -> dict[str, Tolerance]:
    """Defaults overridden by the given values: keys ``*`` (every precision), ``int8`` (one precision),
    and for ``atol`` also ``logits`` (an output, every precision) and ``int8:logits``.

    A bad key or value raises :class:`ConfigError` naming the argument (``min_agreement: ...``).
    """
    check_choice("stat", stat, STATS)
    out = {p: Tolerance(dict(t.atol), t.min_agreement, t.max_metric_drop, t.invariance_atol, stat)
           for p, t in DEFAULT_TOLERANCES.items()}
    for (prec, name), value in _most_specific_last((atol or {}).items(), "atol", True):
        check_number("atol", value, 0)
        for p in ([prec] if prec else PRECISIONS):
            if name is None:
                out[p].atol = {"*": float(value)}
            else:
                out[p].atol[name] = float(value)
    for attr, values, hi in (("min_agreement", min_agreement, 100.0), ("max_metric_drop", max_metric_drop, None),
                             ("invariance_atol", invariance_atol, None)):
        for (prec, _), value in _most_specific_last((values or {}).items(), attr, False):
            check_number(attr, value, 0, hi)
            for p in ([prec] if prec else PRECISIONS):
                setattr(out[p], attr, float(value))
    return out


def _check_tolerances(tolerances: dict) -> None:
    """A config's tolerances: one per precision, every limit a finite number >= 0."""
    for p in PRECISIONS:
        tol = tolerances.get(p) if isinstance(tolerances, dict) else None
        if not isinstance(tol, Tolerance):
            raise ConfigError("tolerances", f"no Tolerance for {p} (build them with make_tolerances)")
        check_choice("tolerances", tol.stat, STATS)
        for value in (tol.min_agreement, tol.max_metric_drop, tol.invariance_atol, *tol.atol.values()):
            check_number("tolerances", value, 0)


# --------------------------------------------------------------------------- metrics

def metric_value(name: str, preds: np.ndarray, labels: Optional[np.ndarray], ref_preds: np.ndarray,
                 num_classes: int) -> float:
    """The task metric in percent: accuracy, F1 (binary: class 1; else macro), MCC, or agreement."""
    if name == "agreement":
        return 100.0 * float(np.mean(preds == ref_preds)) if len(preds) else 100.0
    assert labels is not None
    if name == "accuracy":
        return 100.0 * float(np.mean(preds == labels))
    if name == "f1":
        classes = [1] if num_classes == 2 else sorted(set(labels.tolist()) | set(preds.tolist()))
        scores = []
        for c in classes:
            tp = float(np.sum((preds == c) & (labels == c)))
            fp = float(np.sum((preds == c) & (labels != c)))
            fn = float(np.sum((preds != c) & (labels == c)))
            scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
        return 100.0 * float(np.mean(scores))
    if name == "mcc":
        k = max(num_classes, int(max(preds.max(initial=0), labels.max(initial=0))) + 1)
        cm = np.zeros((k, k), dtype=np.float64)
        np.add.at(cm, (labels, preds), 1)
        t, p, c, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
        den = math.sqrt(max(s * s - float(p @ p), 0.0) * max(s * s - float(t @ t), 0.0))
        return 100.0 * (c * s - float(t @ p)) / den if den else 0.0
    raise ConfigError("metric", f"{name!r}: choose one of {', '.join(METRICS)}")


def output_stats(got: np.ndarray, ref: np.ndarray) -> dict:
    """Absolute-difference statistics and per-sample cosine similarity of one output."""
    got = got.astype(np.float64).reshape(len(got), -1)
    ref = ref.astype(np.float64).reshape(len(ref), -1)
    diff = np.abs(got - ref)
    num = np.sum(got * ref, axis=1)
    den = np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.all(diff == 0, axis=1), 1.0, 0.0))
    finite = bool(np.all(np.isfinite(got)))
    return {"max_abs": float(diff.max()) if finite else float("inf"), "mean_abs": float(diff.mean()),
            "p99_abs": float(np.percentile(diff, 99)) if finite else float("inf"),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "finite": finite}


# --------------------------------------------------------------------------- inputs

@dataclass
class Samples:
    """Encoded samples, unpadded (one dict of 1-D tensors per text, or one image tensor each)."""

    items: list[dict[str, torch.Tensor]]
    labels: Optional[np.ndarray]
    source: str
    generated: bool
    pad_ids: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def max_token_id(self) -> Optional[int]:
        """The largest ``input_ids`` value fed to the models (None for images)."""
        ids = [int(item["input_ids"].max()) for item in self.items if "input_ids" in item and len(item["input_ids"])]
        return max(ids) if ids else None

    def length(self, i: int) -> int:
        first = next(iter(self.items[i].values()))
        return int(first.shape[0]) if first.dim() == 1 else 0

    def collate(self, idx: Sequence[int], pad_to: Optional[int] = None) -> dict[str, torch.Tensor]:
        """One batch, right-padded to its longest sample (or to ``pad_to``, truncating if needed)."""
        rows = [self.items[i] for i in idx]
        names = list(rows[0])
        if rows[0][names[0]].dim() != 1:  # images
            return {n: torch.stack([r[n] for r in rows]) for n in names}
        length = pad_to or max(int(r[names[0]].shape[0]) for r in rows)
        out = {}
        for n in names:
            t = torch.full((len(rows), length), self.pad_ids.get(n, 0), dtype=torch.int64)
            for j, r in enumerate(rows):
                v = r[n][:length]
                t[j, :len(v)] = v
            out[n] = t
        return out


def load_samples(ref, data: Optional[str | Path], limit: Optional[int] = None, max_length: int = 128,
                 text_column: Optional[str] = None, label_column: Optional[str] = None,
                 num_generated: int = 64, seed: int = 0) -> Samples:
    """Rows of ``data`` encoded for ``ref`` (labels mapped to its class ids), or seeded generated inputs."""
    from .core.data import load_images, model_label_map, read_data

    if data is None:
        return _generated(ref, num_generated, max_length, seed)
    table = read_data(data, text_column=text_column, label_column=label_column, limit=limit)
    raw_labels = table.labels
    labels = None
    if raw_labels is not None:
        num = _num_classes(ref)
        lmap = model_label_map(ref.labels, num)
        if lmap is None:
            raise LilyDeployError(f"--data {data}: the reference model has no class labels to compare with")
        labels = np.asarray(lmap.encode(raw_labels, where=f"--data {data}"), dtype=np.int64)
    if hasattr(table, "files"):
        files = table.files[:limit] if limit else table.files
        if labels is not None:
            labels = labels[:len(files)]
        pixels = load_images(files, ref.image_size or 224)
        items = [{"pixel_values": p} for p in pixels]
        return Samples(items, labels, str(data), False, {})
    if ref.tokenizer is None:
        raise LilyDeployError(f"--reference has no tokenizer: text data {data} cannot be encoded")
    enc = ref.tokenizer(list(table.texts), truncation=True, max_length=max_length)
    names = [n for n in ref.input_names if n in enc]
    items = [{n: torch.tensor(enc[n][i], dtype=torch.int64) for n in names} for i in range(len(table.texts))]
    _check_token_ids(items, ref, data)
    pad = ref.tokenizer.pad_token_id
    return Samples(items, labels, str(data), False, {"input_ids": int(pad if pad is not None else 0)})


def _check_token_ids(items: list[dict], ref, data: str | Path) -> None:
    """Refuse ids the reference cannot embed (a tokenizer that does not match the model): torch
    would stop mid-run with an IndexError; this names the file and row instead."""
    cfg = getattr(ref.model, "config", None)
    sizes = {"input_ids": getattr(cfg, "vocab_size", None), "token_type_ids": getattr(cfg, "type_vocab_size", None)}
    first_row = 1 if Path(str(data)).suffix.lower() == ".jsonl" else 2  # as core.data counts rows
    for i, item in enumerate(items):
        for name, size in sizes.items():
            ids = item.get(name)
            if ids is None or not size or not len(ids):
                continue
            bad = [int(v) for v in (ids.min(), ids.max()) if not 0 <= int(v) < int(size)]
            if bad:
                raise LilyDeployError(f"--data {data}: row {i + first_row} encodes to {name} {bad[0]}, outside the "
                                      f"reference model's range 0..{int(size) - 1} (its tokenizer does not match "
                                      "the model)")


def _generated(ref, n: int, max_length: int, seed: int) -> Samples:
    g = torch.Generator().manual_seed(seed)
    if ref.task == "image-cls":
        size = ref.image_size or 224
        items = [{"pixel_values": torch.rand(3, size, size, generator=g) * 2 - 1} for _ in range(n)]
        return Samples(items, None, f"generated ({n} seeded random images)", True, {})
    tok = ref.tokenizer
    vocab = int(getattr(getattr(ref.model, "config", None), "vocab_size", 1000))
    special = {getattr(tok, a, None) for a in ("cls_token_id", "sep_token_id", "pad_token_id")} if tok else set()
    cls = getattr(tok, "cls_token_id", None) if tok else None
    sep = getattr(tok, "sep_token_id", None) if tok else None
    lo = min(1000, vocab // 2)
    hi_len = max(4, min(max_length, 64))
    items = []
    for _ in range(n):
        length = int(torch.randint(3, hi_len + 1, (1,), generator=g))
        ids = torch.randint(lo, vocab, (length,), generator=g)
        ids = torch.tensor([t if t not in special else lo for t in ids.tolist()])
        if cls is not None and sep is not None and length >= 3:
            ids[0], ids[-1] = cls, sep
        item = {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.int64)}
        if "token_type_ids" in ref.input_names:
            item["token_type_ids"] = torch.zeros(length, dtype=torch.int64)
        items.append(item)
    pad = getattr(tok, "pad_token_id", None) if tok else None
    return Samples(items, None, f"generated ({n} seeded random token sequences)", True,
                   {"input_ids": int(pad if pad is not None else 0)})


def _num_classes(ref) -> Optional[int]:
    if ref.labels:
        return len(ref.labels)
    cfg = getattr(ref.model, "config", None)
    return getattr(cfg, "num_labels", None) or getattr(ref.model, "num_classes", None)


# --------------------------------------------------------------------------- candidates

@dataclass
class Candidate:
    """A model under test: where it runs, what it takes and gives, its precision and routing."""

    name: str
    path: Path
    kind: str  # onnx, engine, torch
    backend: str
    precision: str
    routing: Optional[str]  # from its metadata (None: not recorded)
    inputs: dict[str, Optional[type]]  # name -> numpy dtype
    outputs: list[str]
    static_batch: Optional[int] = None
    static_seq: Optional[int] = None
    static_classes: Optional[int] = None
    meta: dict = field(default_factory=dict)
    skip: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    runner: Optional[Runner] = None
    vocab: Optional[int] = None  # rows of its token embedding, where the graph shows them

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Its outputs as float32; a backend failure becomes one line naming the candidate."""
        try:
            out = self.runner.infer(feeds)
        except LilyDeployError:
            raise
        except Exception as exc:  # onnxruntime's / TensorRT's own errors on inputs it refuses
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in feeds.items())
            raise LilyDeployError(f"--candidate {self.path}: {self.backend} failed on {shapes}: {first}") from exc
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def normalise_precision(value: str) -> Optional[str]:
    """A precision label (metadata, a build report) as one of :data:`PRECISIONS`, or None."""
    v = str(value).strip().strip('"').lower()
    for key, names in (("int8", ("int8", "qdq", "int8 (q/dq)")), ("fp16", ("fp16", "float16", "half")),
                       ("bf16", ("bf16", "bfloat16")), ("fp32", ("fp32", "float32", "float"))):
        if v in names or v.startswith(key):
            return key
    return None


def detect_precision(model) -> tuple[str, str]:
    """(precision, how it was decided) for an ONNX ModelProto."""
    from onnx import TensorProto

    meta = {p.key: p.value for p in model.metadata_props}
    if "lily_deploy.precision" in meta:
        p = normalise_precision(meta["lily_deploy.precision"])
        if p:
            return p, "metadata lily_deploy.precision"
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    q = sum(1 for n in nodes if n.op_type in QUANT_OPS)
    if q:
        return "int8", f"{q} quantization nodes in the graph"
    types = {t.data_type for t in model.graph.initializer}
    casts = {a.i for n in nodes if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    if TensorProto.FLOAT16 in types or TensorProto.FLOAT16 in casts:
        return "fp16", "fp16 initializers or casts in the graph"
    if TensorProto.BFLOAT16 in types or TensorProto.BFLOAT16 in casts:
        return "bf16", "bf16 initializers or casts in the graph"
    return "fp32", "no reduced-precision tensors in the graph"


def _static(dim) -> Optional[int]:
    return int(dim) if isinstance(dim, int) and dim > 0 else None


def open_onnx(path: Path, flag: str = "--candidate", threads: Optional[int] = None, adapter=None) -> Candidate:
    from .runtime.onnx_io import load_onnx, metadata
    from .runtime.ort import OrtRunner

    model = load_onnx(path, flag=flag)
    meta = metadata(model)
    precision, why = detect_precision(model)
    runner = OrtRunner(path, threads, flag=flag, adapter=adapter)
    first = runner.input_names[0]
    shape = runner.input_shapes[first]
    batch = _static(shape[0]) if shape else None
    seq = _static(shape[1]) if len(shape) > 1 and first != "pixel_values" else None
    out0 = "logits" if "logits" in runner.output_names else runner.output_names[0]
    classes = _static(runner.output_shapes[out0][-1]) if runner.output_shapes[out0] else None
    c = Candidate(runner.name, path, "onnx", runner.backend, precision, metadata_value(meta, "lily_deploy.routing"),
                  dict(runner.input_dtypes), list(runner.output_names), batch, seq, classes, meta, runner=runner,
                  vocab=onnx_vocab(model))
    c.notes.append(f"precision {precision}: {why}")
    return c


def _report_dtype(name: Optional[str]) -> Optional[type]:
    """A build report's dtype string ("int64", "float32", ...) as a numpy type (None if unknown)."""
    try:
        return np.dtype(name).type if name else None
    except TypeError:
        return None


def open_engine(path: Path, adapter=None) -> Candidate:
    """An engine's I/O from its build report; it runs only where a GPU and the runner are.

    The header is checked first: a file that is no TensorRT plan is an error here, not a skip.
    """
    from .runtime.tensorrt import read_report, report_path

    check_engine_header(path, f"--candidate {path}")
    report = read_report(path) or {}
    inputs = {t["name"]: _report_dtype(t.get("dtype")) for t in report.get("inputs", [])
              if not t["name"].startswith("adapter.")}  # a switchable engine's adapter tensors come from ADAPTER
    outputs = [t["name"] for t in report.get("outputs", [])]
    precision = normalise_precision((report.get("precision") or {}).get("label", "fp32")) or "fp32"
    routing = (report.get("onnx") or {}).get("routing")
    out0 = next((t for t in report.get("outputs", []) if t["name"] == "logits"), None)
    classes = _static((out0.get("onnx_shape") or [None])[-1]) if out0 else None
    report_file = report_path(path)
    c = Candidate(path.name + (f"+{Path(adapter).name}" if adapter else ""), path, "engine", "tensorrt", precision, routing, inputs, outputs,
                  static_classes=classes, meta={"build_report": str(report_file) if report else None})
    if not report:
        c.notes.append(f"no build report {report_file.name}: inputs and outputs are checked when it runs")
    c.skip = _engine_skip_reason(report)
    if c.skip is None:
        c.runner = _engine_runner(path, c, adapter)
    return c


def _engine_skip_reason(report: dict) -> Optional[str]:
    """Why an engine cannot run here (no GPU, no runner, its TensorRT not installed), or None."""
    import importlib.util

    if not cuda_available():
        return "no CUDA GPU here: a TensorRT engine runs only on a GPU (run parity on the GPU machine)"
    module = (report.get("backend") or {}).get("module")
    if module and importlib.util.find_spec(module) is None:
        return f"the engine was built with {module}, which is not installed here"
    if not module and not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
        return "no TensorRT is installed here (pip install 'lily-deploy[tensorrt]' or 'lily-deploy[tensorrt-rtx]')"
    return None


def _engine_runner(path: Path, cand: Candidate, adapter=None) -> Runner:
    """The engine's runtime runner (TensorRT is imported lazily: it is optional)."""
    from .runtime.tensorrt import TrtRunner

    engine = TrtRunner(path, adapter=adapter)
    cand.inputs = cand.inputs or {n: None for n in engine.input_names}
    cand.outputs = cand.outputs or list(engine.output_names)
    return engine


def open_torch_candidate(path: Path, base: Optional[str]) -> Candidate:
    from .core.deploy import DEPLOY_CONFIG, open_model
    from .runtime.torch_runner import TorchRunner

    model = open_model(path, base=base)
    modes = {layer.mode for layer in model.layers.values() if layer.mode != "static"}
    routing = None  # an adapter folder has no deploy routing of its own: it follows the reference
    if (path / DEPLOY_CONFIG).is_file():
        routing = modes.pop() if len(modes) == 1 else ("none" if not modes else None)
    runner = TorchRunner(model, path.name or str(path))
    c = Candidate(path.name or str(path), path, "torch", runner.backend, "fp32", routing,
                  {n: np.int64 for n in model.input_names}, list(runner.output_names), runner=runner)
    c.meta = {"model": model}
    return c


def open_candidate(spec: str | Path, base: Optional[str] = None, threads: Optional[int] = None) -> Candidate:
    """An ONNX file, an engine file, or a model folder (adapter / checkpoint, run in torch)."""
    from .runtime import split_adapter_spec

    text, adapter = split_adapter_spec(spec)  # a switchable graph or engine with its adapter: BASE+TASK.onnx_adapter
    path = Path(text)
    for p in (path, Path(adapter)) if adapter else (path,):
        if not p.exists():
            raise LilyDeployError(f"--candidate {p} does not exist")
    if path.is_dir():
        return open_torch_candidate(path, base)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return open_onnx(path, threads=threads, adapter=adapter)
    if suffix in ENGINE_SUFFIXES:
        return open_engine(path, adapter=adapter)
    raise LilyDeployError(f"--candidate {path}: not an .onnx file, an engine ({', '.join(ENGINE_SUFFIXES)}) "
                          "or a model folder")


def check_compatible(cand: Candidate, ref, ref_outputs: Sequence[str]) -> None:
    """Refuse, naming the candidate, one whose task, labels, inputs or outputs differ from the reference's."""
    from .core.data import model_label_map

    where = f"--candidate {cand.path}"
    task = metadata_value(cand.meta, "lily_deploy.task")
    if task and task != ref.task:
        raise LilyDeployError(f"{where}: was exported for task {task}, the reference is a {ref.task} model")
    labels = metadata_value(cand.meta, "lily_deploy.labels")
    if labels and ref.labels:
        mine = model_label_map(labels).labels
        theirs = model_label_map(ref.labels).labels
        if mine != theirs:
            raise LilyDeployError(f"{where}: labels {', '.join(mine)} differ from the reference's "
                                  f"{', '.join(theirs)}")
    ref_inputs = list(ref.input_names)
    if cand.inputs:
        extra = [n for n in cand.inputs if n not in ref_inputs]
        if extra:
            raise LilyDeployError(f"{where}: needs input {extra[0]!r}, which the reference does not give "
                                  f"(reference inputs: {', '.join(ref_inputs)})")
        for n, dt in cand.inputs.items():
            if dt is not None and n != "pixel_values" and not np.issubdtype(dt, np.integer):
                raise LilyDeployError(f"{where}: input {n!r} is {np.dtype(dt).name}, the reference gives int64 "
                                      "token ids")
            if dt is not None and n == "pixel_values" and not np.issubdtype(dt, np.floating):
                raise LilyDeployError(f"{where}: input {n!r} is {np.dtype(dt).name}, the reference gives float pixels")
        skipped = [n for n in ref_inputs if n not in cand.inputs]
        if skipped:
            cand.notes.append(f"takes no {', '.join(skipped)} (the reference's are not fed to it)")
    if cand.outputs:
        missing = [o for o in ref_outputs if o not in cand.outputs]
        if missing:
            raise LilyDeployError(f"{where}: has no output {missing[0]!r} (its outputs: {', '.join(cand.outputs)}); "
                                  f"the reference gives {', '.join(ref_outputs)}")
    num = _num_classes(ref)
    if cand.static_classes is not None and num and cand.static_classes != num:
        raise LilyDeployError(f"{where}: output logits has {cand.static_classes} classes, the reference has {num}")


# --------------------------------------------------------------------------- results

@dataclass
class Check:
    """One judged quantity; truthy when it passes (``passed`` None: reported, not judged)."""

    name: str
    value: float
    limit: Optional[float]
    passed: Optional[bool]
    detail: str = ""

    def __bool__(self) -> bool:
        return self.passed is not False


@dataclass
class BatchResult:
    batch_size: int
    metric: float
    reference_metric: float
    metric_delta: float
    agreement: float
    outputs: dict[str, dict]


@dataclass
class Invariance:
    samples: int
    max_abs: Optional[float]
    top1_flips: int
    reference_max_abs: Optional[float]
    required: bool
    passed: Optional[bool]
    note: str = ""


@dataclass
class CandidateResult:
    name: str
    path: str
    kind: str
    backend: str
    precision: str
    routing: Optional[str]
    status: str  # PASSED, FAILED, SKIPPED
    reason: str = ""
    tolerance: dict = field(default_factory=dict)
    batches: list[BatchResult] = field(default_factory=list)
    invariance: Optional[Invariance] = None
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.status != "FAILED"

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]


@dataclass
class ParityReport:
    reference: dict
    data: dict
    metric: str
    batch_sizes: list[int]
    candidates: list[CandidateResult]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    allow_skips: bool = False  # whether a run that compared nothing (every candidate skipped) is accepted

    @property
    def skipped(self) -> list[CandidateResult]:
        return [c for c in self.candidates if c.status == "SKIPPED"]

    @property
    def compared(self) -> list[CandidateResult]:
        return [c for c in self.candidates if c.status != "SKIPPED"]

    @property
    def passed(self) -> bool:
        """At least one candidate was compared, and none failed."""
        return bool(self.compared) and all(self.candidates)

    def __bool__(self) -> bool:
        """Whether the run is acceptable: it passed, or it compared nothing and ``allow_skips`` said that is fine."""
        return self.passed or (not self.compared and self.allow_skips)

    @property
    def verdict(self) -> str:
        """PASSED, FAILED, or NOTHING COMPARED: a run that compared nothing never says PASSED."""
        if not self.compared:
            return "NOTHING COMPARED"
        return "PASSED" if self.passed else "FAILED"

    def summary(self) -> str:
        n = {s: sum(1 for c in self.candidates if c.status == s) for s in ("PASSED", "FAILED", "SKIPPED")}
        parts = [f"{n['PASSED']} passed"] + ([f"{n['FAILED']} failed"] if n["FAILED"] else []) + \
                ([f"{n['SKIPPED']} skipped"] if n["SKIPPED"] else [])
        return ", ".join(parts) + f" of {len(self.candidates)} candidates"

    def final_line(self) -> str:
        """One Polygraphy-style line: PASSED / FAILED for what was compared, and what was skipped."""
        detail = self.summary()
        failed = [c for c in self.candidates if not c]
        if failed:
            first = failed[0]
            why = first.failures[0] if first.failures else None
            detail += f"; {first.name}: {why.detail if why is not None else first.reason}"  # a failed Check is falsy
        head = self.verdict
        if not self.compared:
            head += f" ({len(self.skipped)} skipped)"
            detail += "; " + "; ".join(f"{c.name} skipped: {c.reason}" for c in self.skipped)
            if not self.allow_skips:
                detail += "; a run that compares nothing fails (allow_skips / --allow-skips accepts it)"
        elif self.skipped:
            detail += f" (skipped: {', '.join(c.name for c in self.skipped)})"
        return f"{head} | parity: {detail} | {self.seconds:.1f} s"

    def to_json(self) -> dict:
        from .report import environment

        return {
            "schema_version": SCHEMA,
            "kind": "parity",
            "passed": self.passed,
            "verdict": self.verdict,
            "allow_skips": self.allow_skips,
            "summary": self.summary(),
            "reference": self.reference,
            "data": self.data,
            "metric": self.metric,
            "batch_sizes": self.batch_sizes,
            "candidates": [asdict(c) for c in self.candidates],
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
            "environment": environment(),
        }

    # ---- text
    def _rows(self, markdown: bool = False):
        rows = []
        for c in self.candidates:
            if c.status == "SKIPPED":
                rows.append([c.name, c.precision, c.routing or "-", "-", "-", "-", "-", "-", "-", "-", "-",
                             f"SKIPPED ({c.reason})" if markdown else "SKIPPED"])
                continue
            for k, b in enumerate(c.batches):
                o = b.outputs.get("logits") or next(iter(b.outputs.values()))
                rows.append([c.name if k == 0 else "", c.precision if k == 0 else "",
                             (c.routing or "-") if k == 0 else "", str(b.batch_size), f"{b.metric:.2f}",
                             f"{b.metric_delta:+.2f}", f"{b.agreement:.2f}%", f"{o['max_abs']:.2e}",
                             f"{o['mean_abs']:.2e}", f"{o['p99_abs']:.2e}", f"{o['cosine_min']:.6f}",
                             c.status if k == 0 else ""])
        return rows

    def headers(self, markdown: bool = False) -> list[str]:
        diff = ["max abs diff", "mean abs diff", "p99 abs diff"] if markdown else ["max|d|", "mean|d|", "p99|d|"]
        return ["candidate", "precision", "routing", "batch", self.metric, "delta", "agree", *diff, "cos min",
                "status"]

    def table(self) -> str:
        from .report import text_table

        ref = self.reference
        lines = [f"reference  {ref['path']} (torch, {ref['task']}, {ref['lily_layers']} Lily layers, "
                 f"{ref['folded_layers']} folded; labels {', '.join(ref['labels'] or []) or '-'})",
                 f"data       {self.data['source']}: {self.data['rows']} rows, "
                 f"{'labelled' if self.data['labelled'] else 'no labels'}; metric {self.metric}; "
                 f"batch sizes {', '.join(map(str, self.batch_sizes))}",
                 "", text_table(self.headers(), self._rows()), ""]
        for c in self.candidates:
            lines.append(f"{c.name}: {c.status}" + (f" -- {c.reason}" if c.reason else ""))
            if c.invariance is not None:
                lines.append(f"  batch invariance: {_invariance_text(c.invariance)}")
            for ch in c.checks:
                mark = {True: "ok", False: "FAILED", None: "info"}[ch.passed]
                lines.append(f"  [{mark:>6}] {ch.detail}")
            for note in c.notes:
                lines.append(f"  note: {note}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def markdown(self) -> str:
        from .report import markdown_table

        ref = self.reference
        out = [f"# lily-deploy parity: {self.verdict}", "",
               f"- reference: `{ref['path']}` (torch, {ref['task']}, {ref['lily_layers']} Lily layers, "
               f"{ref['folded_layers']} folded)",
               f"- data: `{self.data['source']}`, {self.data['rows']} rows, "
               f"{'labelled' if self.data['labelled'] else 'no labels'}; metric **{self.metric}**",
               f"- {self.summary()} in {self.seconds:.1f} s", "",
               markdown_table(self.headers(markdown=True), self._rows(markdown=True), align="lllrrrrrrrrl"), "",
               "| candidate | batch invariance (alone vs one padded batch) |", "| --- | --- |"]
        for c in self.candidates:
            text = _invariance_text(c.invariance) if c.invariance else c.reason or "-"
            out.append(f"| {c.name} | {text.replace('|d|', 'abs diff').replace('|', '/')} |")
        fails = [(c.name, ch.detail.replace("|d|", "abs diff")) for c in self.candidates for ch in c.failures]
        if fails:
            out += ["", "## Failures", ""] + [f"- {n}: {d}" for n, d in fails]
        return "\n".join(out) + "\n"


def _invariance_text(inv: Invariance) -> str:
    if inv.max_abs is None:
        return inv.note
    verdict = {True: "PASSED", False: "FAILED", None: "finding"}[inv.passed]
    ref = f"; torch reference {inv.reference_max_abs:.2e}" if inv.reference_max_abs is not None else ""
    return (f"{inv.samples} samples: max |d| {inv.max_abs:.2e}, {inv.top1_flips} top-1 flips{ref} -> {verdict}"
            + (f" ({inv.note})" if inv.note else ""))


# --------------------------------------------------------------------------- the run

class _Reference:
    """The torch reference, run once per (routing, batching) and cached."""

    def __init__(self, model, samples: Samples):
        self.model = model
        self.samples = samples
        self.cache: dict = {}
        self.trained = single_routing(model)  # as loaded: the routing it was trained with

    def drift(self, routing: Optional[str], bs: int) -> Optional[str]:
        """Compared under another routing than trained: how far that moves the reference itself (measured)."""
        if self.trained is None or routing in (None, "none", self.trained) or routing not in DYNAMIC_MODES:
            return None
        key = ("drift", self.trained, routing, bs)
        if key not in self.cache:
            pad_to = _pad_to(self.model.task, self.samples, None)
            batches = [self.samples.collate(idx, pad_to) for idx, _ in _plan(len(self.samples), bs, None)]
            moved, kept = routing_drift(self.model, batches, self.trained, routing)
            self.cache[key] = (f"the reference was trained with {self.trained} routing and is compared under "
                               f"{routing}: at batch {bs} that alone moves its logits by up to {moved:.3g}, "
                               f"{100 * kept:.2f}% keep their top-1 class")
        return self.cache[key]

    def run(self, batch: dict[str, torch.Tensor], routing: Optional[str]) -> np.ndarray:
        if routing and routing != "none" and self.model.layers:
            self.model.set_routing(routing)
        with torch.inference_mode():
            return self.model.logits(**batch).float().numpy()


def _plan(n: int, batch_size: int, static_batch: Optional[int]) -> list[tuple[list[int], int]]:
    """Batches as (sample indices, number of real rows); a fixed batch dim gets filler rows."""
    bs = static_batch or batch_size
    plan = []
    for start in range(0, n, bs):
        idx = list(range(start, min(start + bs, n)))
        real = len(idx)
        if static_batch and real < bs:
            idx += [idx[0]] * (bs - real)
        plan.append((idx, real))
    return plan


def _feeds(batch: dict[str, torch.Tensor], cand: Candidate) -> dict[str, torch.Tensor]:
    return {n: t for n, t in batch.items() if not cand.inputs or n in cand.inputs}


def _check_shape(cand: Candidate, name: str, got: np.ndarray, ref: np.ndarray) -> None:
    if tuple(got.shape) != tuple(ref.shape):
        raise LilyDeployError(f"--candidate {cand.path}: output {name!r} has shape {list(got.shape)}, "
                              f"the reference gives {list(ref.shape)}")


def _run_batches(cand: Candidate, ref: _Reference, samples: Samples, bs: int, routing: Optional[str], bar):
    """Candidate and reference logits over every sample, batched the same way."""
    pad = _pad_to(ref.model.task, samples, cand)
    key = (routing, bs, cand.static_batch, pad)
    plan = _plan(len(samples), bs, cand.static_batch)
    ref_out = ref.cache.get(key)
    outs, refs, masks = [], [], []
    for idx, real in plan:
        batch = samples.collate(idx, pad)
        mask = batch.get("attention_mask")
        masks.append(None if mask is None or ref.model.task not in PER_TOKEN_TASKS
                     else mask[:real].numpy().astype(bool))
        got = cand.run(_feeds(batch, cand))
        if ref_out is None:
            refs.append(ref.run(batch, routing)[:real])
        outs.append({k: np.asarray(v)[:real] for k, v in got.items()})
        bar.update(real)
    if ref_out is None:
        ref_out = np.concatenate(refs)
        ref.cache[key] = ref_out
    got = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return got, ref_out, (None if masks[0] is None else np.concatenate(masks))


# per-token tasks: outputs [batch, sequence, ...] compared on the real tokens only (padding excluded)
PER_TOKEN_TASKS = ("token-cls", "qa")


def _pad_to(task: str, samples: Samples, cand: Optional[Candidate]) -> Optional[int]:
    """The sequence length batches are padded to: the candidate's fixed one, or for a per-token task the
    longest sample's (so per-token outputs of every batch line up); None: each batch's longest."""
    fixed = cand.static_seq if cand is not None else None
    if fixed or task not in PER_TOKEN_TASKS or not len(samples):
        return fixed
    return max(samples.length(i) for i in range(len(samples))) or None


def _task_logits(task: str, out: dict) -> np.ndarray:
    """A candidate's outputs as the reference's ``logits``: QA's start and end logits stacked on a last axis."""
    if task == "qa" and "logits" not in out:
        return np.stack([out["start_logits"], out["end_logits"]], -1)
    return out["logits"]


def _task_preds(task: str, logits: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    """The task's own predictions: the class per sample, the class per real token (token classification), or
    QA's span (start and end over the real tokens) as one id per sample, so agreement is span exact match."""
    if task == "token-cls" and mask is not None:
        return logits.argmax(-1)[mask]
    if task == "qa":
        masked = logits if mask is None else np.where(mask[..., None], logits, -np.inf)
        return masked[..., 0].argmax(-1) * logits.shape[1] + masked[..., 1].argmax(-1)
    return logits.argmax(-1)


def _task_stats(task: str, logits: np.ndarray, ref: np.ndarray, mask: Optional[np.ndarray]) -> dict:
    """``output_stats`` per named output, padding positions of per-token outputs set to 0 in both."""
    if task in PER_TOKEN_TASKS and mask is not None:
        logits, ref = (np.where(mask[..., None], x, 0.0) for x in (logits, ref))
    if task == "qa":
        return {n: output_stats(logits[..., i], ref[..., i]) for i, n in enumerate(("start_logits", "end_logits"))}
    return {"logits": output_stats(logits, ref)}


def _invariance_indices(samples: Samples, k: int) -> list[int]:
    """``k`` samples spread over the length distribution (so the batch is mixed and padded)."""
    n = len(samples)
    k = min(k, n)
    order = sorted(range(n), key=lambda i: (samples.length(i), i))
    if k <= 1:
        return order[:k]
    picks = sorted({order[round(j * (n - 1) / (k - 1))] for j in range(k)})
    extra = [i for i in order if i not in picks]
    return (picks + extra)[:k]


def _invariance(cand: Candidate, ref: _Reference, samples: Samples, routing: Optional[str], k: int,
                tol: Tolerance) -> Invariance:
    required = (routing or "sample") in INVARIANCE_REQUIRED
    if cand.static_batch == 1:
        return Invariance(0, None, 0, None, required, None,
                          "not measured: the candidate's batch dimension is fixed at 1")
    if cand.static_batch:
        k = cand.static_batch
    idx = _invariance_indices(samples, k)
    if len(idx) < 2:
        return Invariance(len(idx), None, 0, None, required, None, "not measured: needs at least 2 samples")
    task, pad = ref.model.task, _pad_to(ref.model.task, samples, cand)
    mixed = samples.collate(idx, pad)
    together = _task_logits(task, cand.run(_feeds(mixed, cand))).astype(np.float64)
    ref_together = ref.run(mixed, routing)
    alone, ref_alone = [], []
    for i in idx:
        one = samples.collate([i], pad)
        alone.append(_task_logits(task, cand.run(_feeds(one, cand)))[0])
        ref_alone.append(ref.run(one, routing)[0])
    alone = np.stack(alone).astype(np.float64)
    ref_alone = np.stack(ref_alone)
    if task in PER_TOKEN_TASKS and "attention_mask" in mixed:  # padding positions are not outputs
        real = mixed["attention_mask"].numpy().astype(bool)[..., None]
        alone, together, ref_alone, ref_together = (np.where(real, x, 0.0)
                                                    for x in (alone, together, ref_alone, ref_together))
    diff = float(np.abs(alone - together).max())
    ref_diff = float(np.abs(ref_alone - ref_together).max())
    flips = int(np.sum(alone.argmax(-1) != together.argmax(-1)))
    lengths = sorted({samples.length(i) for i in idx})
    note = f"lengths {lengths[0]}..{lengths[-1]}" if lengths and lengths[-1] else ""
    if required:
        passed = diff <= tol.invariance_atol
        note = f"atol {tol.invariance_atol:g}" + (f", {note}" if note else "")
    else:
        passed = None
        holds = diff <= tol.invariance_atol
        note = ("batch routing mixes one vector over the whole padded batch, as PEFT does: "
                + ("within atol on these inputs" if holds else "outputs depend on the batch")
                + (f"; {note}" if note else ""))
    return Invariance(len(idx), diff, flips, ref_diff, required, passed, note)


def _routing_words(routing: Optional[str]) -> str:
    return "no dynamic Lily layers" if routing == "none" else f"{routing or 'sample'} routing"


def _judge(res: CandidateResult, tol: Tolerance, metric: str) -> None:
    for name in (res.batches[0].outputs if res.batches else {}):
        limit = tol.atol_for(name)
        worst = max(b.outputs[name][f"{tol.stat}_abs"] for b in res.batches)
        if limit is None:
            res.checks.append(Check(f"{name} {tol.stat} abs", worst, None, None,
                                    f"{name}: {tol.stat} |d| {worst:.2e} (reported; {res.precision} is judged on "
                                    "agreement and the task metric)"))
        else:
            res.checks.append(Check(f"{name} {tol.stat} abs", worst, limit, worst <= limit,
                                    f"{name}: {tol.stat} |d| {worst:.2e} {'<=' if worst <= limit else '>'} "
                                    f"atol {limit:g}"))
    agree = min(b.agreement for b in res.batches)
    res.checks.append(Check("top-1 agreement", agree, tol.min_agreement, agree >= tol.min_agreement - 1e-9,
                            f"top-1 agreement {agree:.2f}% {'>=' if agree >= tol.min_agreement - 1e-9 else '<'} "
                            f"{tol.min_agreement:g}%"))
    if metric != "agreement":
        drop = max(-b.metric_delta for b in res.batches)
        ok = drop <= tol.max_metric_drop + 1e-9
        res.checks.append(Check(f"{metric} drop", drop, tol.max_metric_drop, ok,
                                f"{metric} drop {max(drop, 0.0) + 0.0:.2f} points {'<=' if ok else '>'} "
                                f"{tol.max_metric_drop:g}"))
    inv = res.invariance
    if inv is not None and inv.max_abs is not None:
        if inv.required:
            res.checks.append(Check("batch invariance", inv.max_abs, tol.invariance_atol, inv.passed,
                                    f"batch invariance ({_routing_words(res.routing)}): max |d| "
                                    f"{inv.max_abs:.2e} {'<=' if inv.passed else '>'} {tol.invariance_atol:g}"))
        else:
            res.checks.append(Check("batch invariance", inv.max_abs, None, None,
                                    f"batch invariance (batch routing, a finding): a sample's logits move by up "
                                    f"to {inv.max_abs:.2e} inside a padded batch, {inv.top1_flips} of "
                                    f"{inv.samples} top-1 flips"))
    for b in res.batches:
        for name, o in b.outputs.items():
            if not o["finite"]:
                res.checks.append(Check(f"{name} finite", 0.0, None, False,
                                        f"{name}: non-finite values at batch {b.batch_size}"))
    res.status = "PASSED" if all(res.checks) else "FAILED"
    if res.status == "FAILED":
        res.reason = "; ".join(c.detail for c in res.failures)


def check_reference_path(reference: str | Path) -> None:
    p = Path(str(reference))
    if p.suffix.lower() == ".onnx" or p.suffix.lower() in ENGINE_SUFFIXES:
        raise LilyDeployError(f"--reference {p}: the reference is the torch model (an adapter folder, a deploy "
                              "checkpoint or a base model such as minilm), not an exported file")


@dataclass(frozen=True)
class ParityConfig(StageConfig):
    """What :func:`run_parity` compares, on which inputs, judged by which tolerances.

    ``metric`` None: accuracy when ``data`` has labels, else top-1 agreement. ``routing`` None:
    each candidate's recorded routing (``sample`` where it records none; a causal LM: as trained).
    ``limit`` None: every row (prompt). ``threads`` None: torch's and onnxruntime's own.
    ``allow_skips``: a run whose every candidate was skipped is accepted (it still says NOTHING
    COMPARED, never PASSED). ``max_new_tokens``: greedy tokens per prompt when the reference is a
    causal LM (generation parity, :mod:`lily_deploy.generation_parity`), which does not use the
    encoder fields ``max_length``, ``num_generated`` and ``invariance_samples`` (and refuses
    ``metric``, ``text_column`` and ``label_column``).
    """

    reference: str | Path
    candidates: Sequence[str | Path] = ()
    data: Optional[str | Path] = None
    metric: Optional[str] = None
    tolerances: dict = field(default_factory=make_tolerances)
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
    routing: Optional[str] = None
    limit: Optional[int] = None
    max_length: int = 128
    text_column: Optional[str] = None
    label_column: Optional[str] = None
    base: Optional[str] = None
    num_generated: int = 64
    invariance_samples: int = 8
    seed: int = 0
    threads: Optional[int] = None
    allow_skips: bool = False
    progress: bool = True
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", as_tuple(self.candidates))
        object.__setattr__(self, "batch_sizes", as_tuple(self.batch_sizes))
        super().__post_init__()

    def validate(self) -> None:
        if not str(self.reference or ""):
            raise ConfigError("reference", "a value is required: an adapter folder, a deploy checkpoint or a base "
                                           "model such as minilm")
        if not self.candidates:
            raise ConfigError("candidates", "none given: name at least one ONNX file, engine or model folder")
        check_choice("metric", self.metric, METRICS, allow_none=True)
        check_choice("routing", self.routing, DYNAMIC_MODES + STATE_MODES, allow_none=True)
        if not self.batch_sizes:
            raise ConfigError("batch_sizes", "give at least one batch size")
        for b in self.batch_sizes:
            check_number("batch_sizes", b, 1, integer=True)
        check_number("limit", self.limit, 1, integer=True, allow_none=True)
        check_number("max_length", self.max_length, 1, integer=True)
        check_number("num_generated", self.num_generated, 1, integer=True)
        check_number("invariance_samples", self.invariance_samples, 0, integer=True)
        check_number("seed", self.seed, integer=True)
        check_number("threads", self.threads, 1, integer=True, allow_none=True)
        check_number("max_new_tokens", self.max_new_tokens, 1, integer=True)
        if self.data is None and self.metric in LABELLED_METRICS:
            raise ConfigError("metric", f"{self.metric} needs labelled data (a data file with a label column), "
                                        "or use agreement")
        _check_tolerances(self.tolerances)


def run_parity(config: Optional[ParityConfig] = None, /, **fields) -> ParityReport:
    """Run the reference and every candidate on the same inputs and judge each candidate.

    Takes a :class:`ParityConfig`, or its fields as keywords. A candidate whose recorded routing
    differs from an explicit ``routing`` is an error. Bad input raises :class:`LilyDeployError`;
    a failed comparison is a FAILED result, not an error; a run that compared nothing is falsy
    unless ``allow_skips``.
    """
    config = ParityConfig.resolve(config, **fields)
    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(previous)


def _run(config: ParityConfig) -> ParityReport:
    """Check the files, load the reference (a causal LM goes to generation parity) and its inputs,
    open the candidates, compare each."""
    from .core.deploy import open_model

    started = time.perf_counter()
    _check_files(config)
    ref_model = open_model(config.reference, base=config.base).eval()
    _check_tasks(config, ref_model.task)
    if ref_model.task == "causal-lm":
        from .generation_parity import run_generation_parity

        return run_generation_parity(config, ref_model)
    if config.routing in STATE_MODES:
        raise ConfigError("routing", f"{config.routing} routing is for decoders; the reference is a "
                                     f"{ref_model.task} model (route it by {', '.join(DYNAMIC_MODES)})")
    samples, metric = _reference_inputs(config, ref_model)
    cands = _open_candidates(config, ref_model, samples)
    results = _compare_all(config, cands, _Reference(ref_model, samples), samples, metric)
    notes = [f"no data given: {samples.source}; metric is top-1 agreement with the reference"] \
        if samples.generated else []
    return _report(config, ref_model, samples, metric, results, time.perf_counter() - started, notes)


def _check_files(config: ParityConfig) -> None:
    """Checks that need no model: a missing candidate or a file that is no engine should not wait for a load."""
    check_reference_path(config.reference)
    from .runtime import split_adapter_spec

    for spec in config.candidates:
        p = Path(split_adapter_spec(spec)[0])
        if not p.exists():
            raise LilyDeployError(f"--candidate {p} does not exist")
        if p.is_file() and p.suffix.lower() in ENGINE_SUFFIXES:
            check_engine_header(p, f"--candidate {p}")


def candidate_task(path: Path) -> Optional[str]:
    """The task a candidate was made for, read without loading it (None: not recorded, or not a model file)."""
    import json

    from .core.adapters import is_adapter_dir, read_adapter
    from .core.deploy import DEPLOY_CONFIG

    if path.is_file() and path.suffix.lower() == ".onnx":
        from .runtime.onnx_io import load_onnx, metadata

        return metadata_value(metadata(load_onnx(path, flag="--candidate")), "lily_deploy.task")
    if path.is_file() and path.suffix.lower() in ENGINE_SUFFIXES:
        from .runtime.tensorrt import read_report

        return ((read_report(path) or {}).get("onnx") or {}).get("task")
    if path.is_dir() and (path / DEPLOY_CONFIG).is_file():
        try:
            return json.loads((path / DEPLOY_CONFIG).read_text()).get("task")
        except (OSError, ValueError, AttributeError):
            return None  # loading it says what is wrong
    if path.is_dir() and is_adapter_dir(path):
        return read_adapter(path).task
    return None


def _check_tasks(config: ParityConfig, task: str) -> None:
    """Refuse, naming both, a candidate made for another task than the reference (a decoder vs an encoder)."""
    for spec in config.candidates:
        from .runtime import split_adapter_spec

        theirs = candidate_task(Path(split_adapter_spec(spec)[0]))
        if theirs and theirs != task:
            raise LilyDeployError(f"--candidate {spec} is a {theirs} model, but --reference {config.reference} is a "
                                  f"{task} model: parity compares a model with its own deployed forms")


def _reference_inputs(config: ParityConfig, ref_model) -> tuple[Samples, str]:
    """The samples the reference is compared on, and the metric (decided by the labels)."""
    samples = load_samples(ref_model, config.data, config.limit, config.max_length, config.text_column,
                           config.label_column, config.num_generated, config.seed)
    if ref_model.task in PER_TOKEN_TASKS:  # per-token outputs: judged by agreement with the reference's own
        if config.metric not in (None, "agreement"):
            raise LilyDeployError(f"--metric {config.metric}: a {ref_model.task} model is compared by agreement "
                                  "(per token; QA: span exact match); labels per text do not apply")
        samples.labels = None
        samples.notes.append("agreement is " + ("the span exact match (argmax start and end over the real tokens)"
                                                if ref_model.task == "qa" else "per real token")
                             + "; padding positions are not compared")
    metric = config.metric or ("accuracy" if samples.labels is not None else "agreement")
    if metric in LABELLED_METRICS and samples.labels is None:
        raise LilyDeployError(f"--metric {metric} needs labels, but --data {config.data} has no label column "
                              "(looked for label, labels, class, target; name it with --label-column, "
                              "or use --metric agreement)")
    return samples, metric


def _open_candidates(config: ParityConfig, ref_model, samples: Samples) -> list[Candidate]:
    """Every candidate opened and checked against the reference before any of them runs."""
    cands = [open_candidate(spec, base=config.base, threads=config.threads) for spec in config.candidates]
    for c in cands:
        check_compatible(c, ref_model, list(getattr(ref_model, "output_names", ["logits"])))
        top = samples.max_token_id()
        if c.vocab is not None and top is not None and top >= c.vocab:
            raise LilyDeployError(f"--candidate {c.path}: embeds token ids 0..{c.vocab - 1}, but the inputs "
                                  f"({samples.source}) have token id {top}; was it exported from another model?")
    return cands


def _compare_all(config: ParityConfig, cands: list[Candidate], ref: _Reference, samples: Samples,
                 metric: str) -> list[CandidateResult]:
    from tqdm.auto import tqdm

    total = sum(len(samples) * len(config.batch_sizes) for c in cands if c.skip is None)
    bar = tqdm(total=total, desc="parity", unit="sample", disable=None if config.progress else True, leave=False)
    try:
        return [_compare(c, config, ref, samples, metric, bar) for c in cands]
    finally:
        bar.close()


def _compare(c: Candidate, config: ParityConfig, ref: _Reference, samples: Samples, metric: str,
             bar) -> CandidateResult:
    """One candidate against the reference at every batch size, then batch invariance, then judged."""
    res = CandidateResult(c.name, str(c.path), c.kind, c.backend, c.precision, c.routing, "PASSED",
                          notes=list(c.notes))
    if c.skip is not None:
        res.status, res.reason = "SKIPPED", c.skip
        return res
    layers = ref.model.layers
    run_routing = _resolve_routing(c, config.routing, ref.model)
    res.routing = run_routing if layers else (c.routing or "none")
    if c.kind == "torch" and run_routing and run_routing != "none" and c.meta["model"].layers:
        c.meta["model"].set_routing(run_routing)
    tol = config.tolerances[c.precision]
    res.tolerance = asdict(tol)
    num_classes = _num_classes(ref.model) or 2
    for bs in config.batch_sizes:
        res.batches.append(_batch_result(c, ref, samples, int(bs), run_routing, metric, num_classes, bar))
        if c.static_batch and c.static_batch != bs:
            res.notes.append(f"batch dimension fixed at {c.static_batch}: ran batch {c.static_batch} "
                             f"instead of {bs}")
            break
    res.invariance = _invariance(c, ref, samples, run_routing if layers else "none", config.invariance_samples, tol)
    drift = ref.drift(run_routing, int(config.batch_sizes[-1]))
    if drift:
        res.notes.append(drift)
    _judge(res, tol, metric)
    return res


def _batch_result(c: Candidate, ref: _Reference, samples: Samples, bs: int, routing: Optional[str], metric: str,
                  num_classes: int, bar) -> BatchResult:
    """Candidate vs reference over every sample in batches of ``bs``: the metric, agreement and diffs."""
    got, ref_out, mask = _run_batches(c, ref, samples, bs, routing, bar)
    task = ref.model.task
    logits = _task_logits(task, got)
    _check_shape(c, "logits", logits, ref_out)
    ref_preds, preds = _task_preds(task, ref_out, mask), _task_preds(task, logits, mask)
    ref_metric = metric_value(metric, ref_preds, samples.labels, ref_preds, num_classes)
    cand_metric = metric_value(metric, preds, samples.labels, ref_preds, num_classes)
    return BatchResult(c.static_batch or bs, cand_metric, ref_metric, cand_metric - ref_metric,
                       100.0 * float(np.mean(preds == ref_preds)), _task_stats(task, logits, ref_out, mask))


def _report(config: ParityConfig, ref_model, samples: Samples, metric: str, results: list[CandidateResult],
            seconds: float, notes: list[str]) -> ParityReport:
    reference_info = {"path": str(config.reference), "backend": "torch-cpu", "task": ref_model.task,
                      "labels": ref_model.labels and [str(x) for x in ref_model.labels],
                      "lily_layers": len(ref_model.layers), "folded_layers": len(ref_model.folded or {}),
                      "base_model": ref_model.meta.get("base_model")}
    data_info = {"source": samples.source, "rows": len(samples), "labelled": samples.labels is not None,
                 "generated": samples.generated, "max_length": config.max_length, "limit": config.limit}
    return ParityReport(reference_info, data_info, metric, [int(b) for b in config.batch_sizes], results, seconds,
                        notes, config.allow_skips)


def _resolve_routing(c: Candidate, routing: Optional[str], ref_model) -> Optional[str]:
    """The routing the reference runs in for candidate ``c``."""
    recorded = c.routing if c.routing not in (None, "none") else None
    if routing is not None and recorded is not None and recorded != routing:
        raise LilyDeployError(f"--candidate {c.path}: was exported with --routing {recorded}, but --routing "
                              f"{routing} was asked for the reference (drop --routing to follow each candidate)")
    if c.routing == "none" and not routing:
        return "sample"
    return recorded or routing or "sample"
