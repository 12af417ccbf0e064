"""``quickstart``: the whole pipeline on an embedded default, in one command.

MiniLM (packaged) is fine-tuned with Lily on a generated review set (``lily_deploy.datasets``)
for a few CPU minutes with batch-invariant ``sample`` routing, then folded (auto), exported,
quantized to INT8, built into a TensorRT-for-RTX engine where that backend is installed, checked
for parity and benchmarked. Every artifact stays in OUT_DIR with ``summary.json``.

Each stage writes its outputs atomically and marks itself done in ``quickstart_state.json``;
running again after an interruption skips finished stages and resumes fine-tuning from its
last checkpoint, so no artifact is ever half-written.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .core.errors import LilyDeployError
from .core.fileio import write_json

STATE = "quickstart_state.json"
SUMMARY = "summary.json"


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

    def done(self, stage: str, *artifacts: Path) -> bool:
        return bool(self.state.get(stage, {}).get("done")) and all(Path(a).exists() for a in artifacts)

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


def _size(path: Path) -> Optional[int]:
    if not path.exists():
        return None
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def quickstart(
    output: str | Path = "out/quickstart",
    train: Optional[str | Path] = None,
    val: Optional[str | Path] = None,
    steps: int = 250,
    batch_size: int = 32,
    rank: int = 16,
    num_hp: int = 4,
    lp_stride: int = 2,
    scale: float = 1.0,
    lr: float = 3e-3,
    calib_size: int = 256,
    engine: bool = True,
    bench: bool = True,
    fresh: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run finetune -> fold -> export -> quantize -> build-trt -> parity -> bench; return the summary."""
    import shutil

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise LilyDeployError(f"-o {out}: exists and is not a folder")
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    p = Pipeline(out)
    if (train is None) != (val is None):
        raise LilyDeployError("give both --train and --val, or neither (the embedded data set is used)")

    def stage(name: str) -> None:
        done = " (done in an earlier run: kept)" if p.state.get(name, {}).get("done") else ""
        log(f"\n== {name}{done}")

    # 1. data
    stage("data")
    if train is None:
        from .datasets import write_reviews

        if not p.done("data", p.data_dir / "train.tsv", p.data_dir / "val.tsv"):
            write_reviews(p.data_dir)
            p.mark("data", 0.0, source="generated movie-review templates (lily_deploy.datasets)")
        train, val = p.data_dir / "train.tsv", p.data_dir / "val.tsv"
        log(f"embedded data set: {train} and {val}")
    else:
        log(f"your data: {train} and {val}")

    # 2. finetune (Lily, sample routing so training and deployment agree)
    stage("finetune")
    if not p.done("finetune", p.adapter / "adapter_config.json"):
        from .training import finetune

        t = time.time()
        resume = (p.adapter / "checkpoints" / "last").exists()
        if resume:
            log("resuming fine-tuning from its last checkpoint")
        result = finetune("minilm", train, val, p.adapter, method="lily", rank=rank, num_hp=num_hp,
                          lp_stride=lp_stride, scale=scale, max_steps=steps, batch_size=batch_size, lr=lr,
                          routing="sample", max_length=64, eval_every=max(steps // 2, 1), resume=resume,
                          overwrite=not resume, progress=progress, log=log)
        p.mark("finetune", time.time() - t, val_accuracy=result.best_val_accuracy, steps=result.steps,
               trainable_params=result.trainable_params, samples_per_s=result.samples_per_s)
    ft = p.details("finetune")
    log(f"adapter {p.adapter}: validation accuracy {ft.get('val_accuracy')}")

    # 3. fold (auto, within 0.1 point on the validation data)
    stage("fold")
    if not p.done("fold", p.folded / "deploy_config.json"):
        from .folding import fold

        t = time.time()
        report = fold(p.adapter, p.folded, calib=val, strategy="auto", max_metric_drop=0.1, size=calib_size,
                      progress=progress)
        log(report.table())
        p.mark("fold", time.time() - t, folded=len(report.folded), layers=len(report.layers),
               metric_before=report.metric_before, metric_after=report.metric_after)
    fd = p.details("fold")
    log(f"folded {fd['folded']}/{fd['layers']} layers; calibration accuracy {fd['metric_before']:.2f} -> "
        f"{fd['metric_after']:.2f}")

    # 4. export (the folded checkpoint; dynamic layers as lily::HPMix) and the base model for ratios
    stage("export")
    if not p.done("export", p.onnx, p.base_onnx):
        from .onnx_export import export_onnx

        t = time.time()
        result = export_onnx(p.folded, p.onnx, routing="sample", data=val)
        log(result.table())
        if not result.passed:
            raise LilyDeployError("export validation failed; see the table above")
        export_onnx("minilm", p.base_onnx, validate=False)
        p.mark("export", time.time() - t, dynamic_layers=result.dynamic_layers, folded_layers=result.folded_layers,
               max_abs=max(c.max_abs for c in result.comparisons))

    # 5. quantize (int8 Q/DQ, calibrated on training rows, validated on the validation set)
    stage("quantize")
    if not p.done("quantize", p.int8):
        from .precision import quantize

        t = time.time()
        q = quantize(p.onnx, p.int8, precision="int8", calib=train, calib_size=calib_size, val=val,
                     model=str(p.folded), max_accuracy_drop=1.0, progress=progress)
        log(q.table())
        v = q.validation
        p.mark("quantize", time.time() - t, **({} if v is None else {"validation": asdict(v)}))

    # 6. build-trt (TensorRT for RTX builds without a GPU)
    stage("build-trt")
    engine_note = None
    if engine and not p.done("build-trt", p.engine):
        from .runtime.tensorrt import load_backend
        from .trt_build import build_engine

        try:
            load_backend("auto")
        except LilyDeployError as exc:
            engine_note = f"skipped: {exc}"
        else:
            t = time.time()
            report = build_engine(p.int8, p.engine, progress=progress)
            log(report.table())
            p.mark("build-trt", time.time() - t, backend=report["backend"])
    elif not engine:
        engine_note = "skipped (--no-engine)"
    if engine_note:
        log(engine_note + " -- install TensorRT for RTX to build engines on any machine: "
            "pip install 'lily-deploy[tensorrt-rtx]'")

    # 7. parity: the exported artifacts against the torch model they were exported from (the folded
    #    checkpoint; what folding itself changed was measured by the fold stage)
    stage("parity")
    from .parity_check import run_parity
    from .report import write_reports

    candidates = [p.onnx, p.int8] + ([p.engine] if p.engine.exists() else [])
    parity = run_parity(p.folded, candidates, data=val, routing="sample", batch_sizes=[8], progress=progress)
    log(parity.table())
    log(parity.final_line())
    write_reports(parity.to_json(), parity.markdown(), p.parity_dir)

    # 8. bench (onnxruntime: base vs Lily vs int8, interleaved)
    bench_json = None
    if bench:
        stage("bench")
        from .benchmark import run_bench

        result = run_bench([str(p.base_onnx), str(p.onnx), str(p.int8)], batch_sizes=[1, 8], seq_lens=[128],
                           base=[str(p.base_onnx)], backends=["onnxruntime"], warmup=3, iters=15, progress=progress)
        log(result.table())
        bench_json = result.to_json()
        write_reports(bench_json, result.markdown(), p.bench_dir)

    summary = {
        "output": str(out),
        "stages": p.state,
        "parity": parity.to_json(),
        "bench": bench_json,
        "files": {name: _size(path) for name, path in (("adapter", p.adapter), ("folded", p.folded),
                                                          ("model.onnx", p.onnx), ("model.int8.onnx", p.int8),
                                                          ("model.plan", p.engine), ("base.onnx", p.base_onnx))},
        "engine": engine_note or ("built" if p.engine.exists() else "not built"),
    }
    write_json(p.out / SUMMARY, summary)
    if not parity:
        raise LilyDeployError(f"parity FAILED: {parity.final_line()} (see {p.parity_dir})")
    return summary


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
