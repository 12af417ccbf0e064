"""``quickstart``: the whole pipeline on an embedded default, in one command.

MiniLM (packaged) is fine-tuned with Lily on a generated review set (``lily_deploy.datasets``)
for a few CPU minutes with batch-invariant ``sample`` routing, then folded (auto), exported,
quantized to INT8, built into a TensorRT-for-RTX engine where that backend is installed, checked
for parity and benchmarked. Every artifact stays in OUT_DIR with ``summary.json``.

The pipeline is a declared list of :class:`Stage` objects run by :func:`run_stages`, which does
the bookkeeping once for all of them (``benchmarks/ci_parity.py`` runs its own list through it):
each stage writes its outputs atomically and is marked done in ``quickstart_state.json``;
running again after an interruption skips finished stages and resumes fine-tuning from its
last checkpoint, so no artifact is ever half-written.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .core.config import ConfigError, StageConfig, check_number
from .core.errors import LilyDeployError
from .core.fileio import check_not_input, write_json

STATE = "quickstart_state.json"
SUMMARY = "summary.json"
INSTALL_TRT = "install TensorRT for RTX to build engines on any machine: pip install 'lily-deploy[tensorrt-rtx]'"


# ------------------------------------------------------------------------- the stage runner

class StageSkipped(Exception):
    """Raised by a stage's run step that finds it cannot run here (a back end is not installed)."""


def _run_always(ctx) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Stage:
    """One pipeline step: its name, the artifacts that prove it finished, and the step itself.

    ``run(ctx)`` does the work and returns the details to record (or None); ``skip(ctx)`` says
    why the stage should not run now (None: run it); ``after(ctx)`` logs what a reader wants to
    see whether the stage ran now or in an earlier run. ``artifacts`` are paths relative to the
    state's folder; a stage without any is not resumable and runs every time. ``hint`` is told
    the user when the stage is skipped.
    """

    name: str
    run: Callable[[Any], Optional[dict]]
    artifacts: tuple[str, ...] = ()
    skip: Callable[[Any], Optional[str]] = _run_always
    after: Optional[Callable[[Any], None]] = None
    hint: str = ""


class StageLog:
    """What :func:`run_stages` tells the user about each stage; this one tells nothing."""

    def start(self, stage: Stage, kept: bool) -> None:
        """Before a stage: ``kept`` when an earlier run finished it."""

    def skipped(self, stage: Stage, reason: str) -> None:
        """A stage that did not run, and why."""

    def finished(self, stage: Stage, seconds: float) -> None:
        """A stage that ran now, and how long it took."""


@dataclass
class StagesRun:
    """What one pass over the stages did: seconds per stage run now, reasons per stage skipped."""

    timings: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def run_stages(stages: Sequence[Stage], ctx: Any, log: Optional[StageLog] = None,
               state: Optional[Pipeline] = None) -> StagesRun:
    """Run ``stages`` in order on ``ctx``, doing the bookkeeping once for all of them.

    A stage whose ``skip`` gives a reason does not run. With ``state``, a resumable stage that an
    earlier run finished (marked done, artifacts present) is kept, and one that runs now is
    marked done with the details it returns. Every stage that runs is timed.
    """
    log = log or StageLog()
    result = StagesRun()
    for stage in stages:
        reason = stage.skip(ctx)
        kept = reason is None and state is not None and state.done(stage)
        log.start(stage, kept)
        if reason is None and not kept:
            reason = _run_stage(stage, ctx, state, result)
            if reason is None:
                log.finished(stage, result.timings[stage.name])
        if reason is not None:
            result.skipped[stage.name] = reason
            log.skipped(stage, reason)
        elif stage.after is not None:
            stage.after(ctx)
    return result


def _run_stage(stage: Stage, ctx: Any, state: Optional[Pipeline], result: StagesRun) -> Optional[str]:
    """Run one stage, timed, and mark it done; the reason it gave up, if it did (else None)."""
    started = time.perf_counter()
    try:
        details = stage.run(ctx)
    except StageSkipped as exc:
        return str(exc)
    result.timings[stage.name] = time.perf_counter() - started
    if state is not None and stage.artifacts:
        state.mark(stage.name, result.timings[stage.name], **(details or {}))
    return None


@dataclass
class Pipeline:
    """Paths of every artifact, and the done-markers that make a rerun resume."""

    out: Path
    state: dict = field(default_factory=dict)

    def __post_init__(self):
        path = self.out / STATE
        if path.is_file():
            try:
                self.state = json.loads(path.read_text())
            except json.JSONDecodeError:
                self.state = {}

    def done(self, stage: Stage) -> bool:
        """Whether an earlier run finished ``stage`` and its artifacts are still there."""
        return (bool(stage.artifacts) and bool(self.state.get(stage.name, {}).get("done"))
                and all((self.out / a).exists() for a in stage.artifacts))

    def mark(self, stage: str, seconds: float, **details) -> None:
        self.state[stage] = {"done": True, "seconds": round(seconds, 2), **details}
        write_json(self.out / STATE, self.state)

    def details(self, stage: str) -> dict:
        return self.state.get(stage, {})

    def __getattr__(self, name):  # artifact paths
        paths = {
            "data_dir": "data", "adapter": "adapter", "folded": "folded", "onnx": "model.onnx",
            "int8": "model.int8.onnx", "engine": "model.plan", "base_onnx": "base.onnx", "parity_dir": "parity",
            "bench_dir": "bench",
        }
        if name in paths:
            return self.out / paths[name]
        raise AttributeError(name)


# ------------------------------------------------------------------------- quickstart

@dataclass(frozen=True)
class QuickstartConfig(StageConfig):
    """What :func:`quickstart` runs; the fields are its keyword parameters.

    ``train``/``val`` (both or neither) replace the embedded review set. ``steps``,
    ``batch_size``, ``rank``, ``num_hp``, ``lp_stride``, ``scale`` and ``lr`` set the fine-tuning;
    ``calib_size`` the rows fold and quantize calibrate on. ``engine``/``bench`` turn the
    TensorRT build and the benchmark on or off; ``fresh`` starts over instead of resuming.
    ``log`` receives every line the pipeline reports.
    """

    output: str | Path = "out/quickstart"
    train: Optional[str | Path] = None
    val: Optional[str | Path] = None
    steps: int = 250
    batch_size: int = 32
    rank: int = 16
    num_hp: int = 4
    lp_stride: int = 2
    scale: float = 1.0
    lr: float = 3e-3
    calib_size: int = 256
    engine: bool = True
    bench: bool = True
    fresh: bool = False
    progress: bool = True
    log: Callable[[str], None] = print

    def validate(self) -> None:
        for name in ("steps", "batch_size", "rank", "num_hp", "lp_stride", "calib_size"):
            check_number(name, getattr(self, name), minimum=1, integer=True)
        check_number("scale", self.scale)
        check_number("lr", self.lr, minimum=0, strict_min=True)
        if (self.train is None) != (self.val is None):
            raise ConfigError("val" if self.val is None else "train",
                              "give both train and val, or neither (the embedded data set is used)")


@dataclass
class _Quickstart:
    """What the quickstart stages share: the config, the artifact paths, the data, the results."""

    config: QuickstartConfig
    p: Pipeline
    train: Path
    val: Path
    parity: Any = None
    bench: Optional[dict] = None

    def log(self, message: str) -> None:
        self.config.log(message)


class _QuickstartLog(StageLog):
    """A header per stage (saying when an earlier run's result is kept), and why a stage is skipped."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def start(self, stage: Stage, kept: bool) -> None:
        self.log(f"\n== {stage.name}{' (done in an earlier run: kept)' if kept else ''}")

    def skipped(self, stage: Stage, reason: str) -> None:
        self.log(reason + (f" -- {stage.hint}" if stage.hint else ""))


def quickstart(config: Optional[QuickstartConfig] = None, /, **fields) -> dict:
    """Run finetune -> fold -> export -> quantize -> build-trt -> parity -> bench; return the summary.

    The fields are :class:`QuickstartConfig`'s. Raises :class:`LilyDeployError` when parity fails
    (after writing the summary).
    """
    config = QuickstartConfig.resolve(config, **fields)
    p = Pipeline(_prepare_output(config))
    if config.train is None:
        train, val = p.data_dir / "train.tsv", p.data_dir / "val.tsv"
    else:
        train, val = Path(config.train), Path(config.val)
    q = _Quickstart(config, p, train, val)
    run = run_stages(QUICKSTART_STAGES, q, _QuickstartLog(config.log), state=p)
    summary = _summary(q, run)
    write_json(p.out / SUMMARY, summary)
    if not q.parity:
        raise LilyDeployError(f"parity FAILED: {q.parity.final_line()} (see {p.parity_dir})")
    return summary


def _prepare_output(config: QuickstartConfig) -> Path:
    """The output folder, made (emptied first with ``fresh``) once it is sure to hold no input."""
    out = Path(config.output)
    inputs = {"training data": config.train, "validation data": config.val}
    check_not_input(out, inputs, "-o")
    for what, path in inputs.items():  # --fresh empties the folder: an input inside it would be lost
        if path is not None and Path(path).exists() and out.resolve() in Path(path).resolve().parents:
            raise LilyDeployError(f"-o {out}: holds the input {what} {path}; write the artifacts to another "
                                  "folder (inputs are never overwritten)")
    if out.exists() and not out.is_dir():
        raise LilyDeployError(f"-o {out}: exists and is not a folder")
    if config.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _size(path: Path) -> Optional[int]:
    if not path.exists():
        return None
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _summary(q: _Quickstart, run: StagesRun) -> dict:
    """``summary.json``: every stage's record, the parity and bench reports, artifact sizes."""
    p = q.p
    files = (("adapter", p.adapter), ("folded", p.folded), ("model.onnx", p.onnx), ("model.int8.onnx", p.int8),
             ("model.plan", p.engine), ("base.onnx", p.base_onnx))
    return {
        "output": str(p.out),
        "stages": p.state,
        "timings": {name: round(s, 2) for name, s in run.timings.items()},
        "parity": q.parity.to_json(),
        "bench": q.bench,
        "files": {name: _size(path) for name, path in files},
        "engine": run.skipped.get("build-trt") or ("built" if p.engine.exists() else "not built"),
    }


# ---- the stages, in order

def _your_data(q: _Quickstart) -> Optional[str]:
    return None if q.config.train is None else f"your data: {q.train} and {q.val}"


def _write_data(q: _Quickstart) -> dict:
    from .datasets import write_reviews

    write_reviews(q.p.data_dir)
    return {"source": "generated movie-review templates (lily_deploy.datasets)"}


def _finetune(q: _Quickstart) -> dict:
    """Lily with sample routing, so training and deployment agree; resumes from its last checkpoint."""
    from .training import finetune

    c = q.config
    resume = (q.p.adapter / "checkpoints" / "last").exists()
    if resume:
        q.log("resuming fine-tuning from its last checkpoint")
    result = finetune(model="minilm", train=q.train, val=q.val, output=q.p.adapter, method="lily", rank=c.rank,
                      num_hp=c.num_hp, lp_stride=c.lp_stride, scale=c.scale, max_steps=c.steps,
                      batch_size=c.batch_size, lr=c.lr, routing="sample", max_length=64,
                      eval_every=max(c.steps // 2, 1), resume=resume, overwrite=not resume, progress=c.progress,
                      log=q.log)
    return {"val_accuracy": result.best_val_accuracy, "steps": result.steps,
            "trainable_params": result.trainable_params, "samples_per_s": result.samples_per_s}


def _fold(q: _Quickstart) -> dict:
    """Auto, within 0.1 point on the validation data."""
    from .folding import fold

    report = fold(source=q.p.adapter, output=q.p.folded, calib=q.val, strategy="auto", max_metric_drop=0.1,
                  size=q.config.calib_size, progress=q.config.progress)
    q.log(report.table())
    return {"folded": len(report.folded), "layers": len(report.layers), "metric_before": report.metric_before,
            "metric_after": report.metric_after}


def _export(q: _Quickstart) -> dict:
    """The folded checkpoint (dynamic layers as lily::HPMix), and the base model for latency ratios."""
    from .onnx_export import export_onnx

    result = export_onnx(source=q.p.folded, output=q.p.onnx, routing="sample", data=q.val)
    q.log(result.table())
    if not result.passed:
        raise LilyDeployError("export validation failed; see the table above")
    export_onnx(source="minilm", output=q.p.base_onnx, validation=False)
    return {"dynamic_layers": result.dynamic_layers, "folded_layers": result.folded_layers,
            "max_abs": max(c.max_abs for c in result.comparisons)}


def _quantize(q: _Quickstart) -> dict:
    """INT8 Q/DQ, calibrated on training rows, validated on the validation set."""
    from .precision import quantize

    result = quantize(model_path=q.p.onnx, output=q.p.int8, precision="int8", calib=q.train,
                      calib_size=q.config.calib_size, val=q.val, model=str(q.p.folded), max_accuracy_drop=1.0,
                      progress=q.config.progress)
    q.log(result.table())
    return {} if result.validation is None else {"validation": asdict(result.validation)}


def _engine_wanted(q: _Quickstart) -> Optional[str]:
    return None if q.config.engine else "skipped (no engine asked for)"


def _build_engine(q: _Quickstart) -> dict:
    """TensorRT for RTX builds without a GPU; without the back end the stage is skipped, saying so."""
    from .runtime.tensorrt import load_backend
    from .trt_build import build_engine

    try:
        load_backend("auto")
    except LilyDeployError as exc:
        raise StageSkipped(f"skipped: {exc}") from None
    report = build_engine(onnx_path=q.p.int8, output=q.p.engine, progress=q.config.progress)
    q.log(report.table())
    return {"backend": report["backend"]}


def _parity(q: _Quickstart) -> None:
    """The exported artifacts against the torch model they came from (the folded checkpoint).

    What folding itself changed was measured by the fold stage.
    """
    from .parity_check import run_parity
    from .report import write_reports

    p = q.p
    candidates = [p.onnx, p.int8] + ([p.engine] if p.engine.exists() else [])
    q.parity = run_parity(reference=p.folded, candidates=candidates, data=q.val, routing="sample", batch_sizes=[8],
                          progress=q.config.progress)
    q.log(q.parity.table())
    q.log(q.parity.final_line())
    write_reports(q.parity.to_json(), q.parity.markdown(), p.parity_dir)


def _bench_wanted(q: _Quickstart) -> Optional[str]:
    return None if q.config.bench else "skipped (no benchmark asked for)"


def _bench(q: _Quickstart) -> None:
    """onnxruntime: base vs Lily vs int8, interleaved."""
    from .benchmark import run_bench
    from .report import write_reports

    p = q.p
    result = run_bench(models=[str(p.base_onnx), str(p.onnx), str(p.int8)], batch_sizes=[1, 8], seq_lens=[128],
                       base=[str(p.base_onnx)], backends=["onnxruntime"], warmup=3, iters=15,
                       progress=q.config.progress)
    q.log(result.table())
    q.bench = result.to_json()
    write_reports(q.bench, result.markdown(), p.bench_dir)


def _log_data(q: _Quickstart) -> None:
    q.log(f"embedded data set: {q.train} and {q.val}")


def _log_finetune(q: _Quickstart) -> None:
    q.log(f"adapter {q.p.adapter}: validation accuracy {q.p.details('finetune').get('val_accuracy')}")


def _log_fold(q: _Quickstart) -> None:
    fd = q.p.details("fold")
    q.log(f"folded {fd['folded']}/{fd['layers']} layers; calibration accuracy {fd['metric_before']:.2f} -> "
          f"{fd['metric_after']:.2f}")


QUICKSTART_STAGES = (
    Stage("data", _write_data, ("data/train.tsv", "data/val.tsv"), skip=_your_data, after=_log_data),
    Stage("finetune", _finetune, ("adapter/adapter_config.json",), after=_log_finetune),
    Stage("fold", _fold, ("folded/deploy_config.json",), after=_log_fold),
    Stage("export", _export, ("model.onnx", "base.onnx")),
    Stage("quantize", _quantize, ("model.int8.onnx",)),
    Stage("build-trt", _build_engine, ("model.plan",), skip=_engine_wanted, hint=INSTALL_TRT),
    Stage("parity", _parity),
    Stage("bench", _bench, skip=_bench_wanted),
)


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def format_summary(summary: dict) -> str:
    """One table: accuracy per stage and backend, latency ratios to the base model, file sizes."""
    stages, files = summary["stages"], summary["files"]
    rows = [("stage", "artifact", "backend", "accuracy", "x base (b1 / b8)", "size")]
    ft = stages.get("finetune", {})
    acc = ft.get("val_accuracy")
    rows.append(("finetune", "adapter/", "torch", f"{100 * acc:.2f}" if acc is not None else "-", "-",
                 _mib(files.get("adapter"))))
    fd = stages.get("fold", {})
    if fd:
        rows.append(("fold", "folded/", "torch", f"{fd['metric_before']:.2f} -> {fd['metric_after']:.2f} "
                     f"({fd['folded']}/{fd['layers']} folded)", "-", _mib(files.get("folded"))))
    parity = summary["parity"]
    ref_metric = None
    for c in parity["candidates"]:
        name = Path(c["path"]).name
        if c["status"] == "SKIPPED":
            short = c["reason"].split(":")[0]
            rows.append(("parity", name, c["backend"], f"SKIPPED ({short})", "-", _mib(files.get(name))))
            continue
        b = c["batches"][-1]
        ref_metric = b["reference_metric"]
        rows.append(("parity", name, c["backend"], f"{b['metric']:.2f} ({b['metric_delta']:+.2f}), {c['status']}",
                     _by_model(summary, name), _mib(files.get(name))))
    if ref_metric is not None:
        rows.insert(3, ("reference", "folded/ (sample routing)", "torch", f"{ref_metric:.2f}", "-", "-"))
    rows.append(("build-trt", "model.plan", "TensorRT for RTX", summary["engine"], "-", _mib(files.get("model.plan"))))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"\n{parity['summary']}; every artifact and summary.json are in {summary['output']}")
    return "\n".join(lines)


def _by_model(summary: dict, name: str) -> str:
    """``x base`` at batch 1 and 8 for the bench rows of model file ``name``."""
    rows = [r for r in (summary.get("bench") or {}).get("results", [])
            if Path(str(r.get("model"))).name in (name, Path(name).stem) and r.get("overhead_vs_base") is not None]
    return " / ".join(f"{r['overhead_vs_base']:.3f}" for r in sorted(rows, key=lambda r: r["batch_size"])) or "-"
