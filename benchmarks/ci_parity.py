"""End-to-end parity benchmark for CI: MiniLM + Lily through fold, export, quantize and build-trt,
then ``parity`` on a fixed slice of ``../shared/data/sst2/dev.tsv``. Exit 1 on any parity failure.

    python benchmarks/ci_parity.py --out out/ci          # what .ci/run calls
    python benchmarks/ci_parity.py --out out/ci --keep   # also keep the models in out/ci/work

Steps (each stage that is not installed is skipped and said so, never faked):
1. adapter: a few fine-tuning steps on sst2/train.tsv (``lily_deploy.training``, sample routing), or,
   without it, a seeded random-but-nonzero PEFT-Lily adapter;
2. fold (auto, calibration on train rows) -> a deploy checkpoint;
3. export: the adapter with sample routing and with batch routing, and the folded checkpoint;
4. quantize (``lily_deploy.precision``): FP16 and INT8 (Q/DQ) from the sample-routing graph;
5. build-trt (``lily_deploy.trt_build`` + TensorRT for RTX): an engine for sm89, ahead of time;
6. parity: the adapter (torch) vs the fp32/fp16/int8 graphs and the engine (skipped without a GPU),
   and the folded checkpoint vs its graph, on the first ``--rows`` rows of sst2/dev.tsv (1000: on
   200 rows a 1-point accuracy budget is 2 samples, and the same INT8 graph measured -2.0 points on
   the first 200 rows and -0.1 on the first 1000), in batches of 8; batch invariance checks each
   of 8 samples alone (batch 1) against one mixed, padded batch.
Reports: ``OUT/parity/parity.{json,md,png}``, ``OUT/parity-folded/...`` and ``OUT/summary.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# idle OpenMP threads must sleep, not spin: this runs on 2 shared cores (set before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "sst2"
warnings.filterwarnings("ignore")

from lily_deploy.pipeline import Stage, StageLog, run_stages  # noqa: E402  (light: no torch)


def say(msg: str) -> None:
    print(msg, flush=True)


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def random_adapter(out: Path, seed: int = 0) -> Path:
    """A PEFT-Lily adapter on MiniLM with random non-zero HPs (as after training), seeded."""
    from lily_deploy.core.adapters import random_lily_adapter

    return random_lily_adapter("minilm", out, ["query", "value"], num_labels=2, rank=8, num_hp=4, lp_stride=2,
                               seed=seed, labels=["0", "1"])


@dataclass
class _CI:
    """What the CI stages share: the arguments, the data, the models made so far, notes and reports."""

    args: argparse.Namespace
    work: Path
    out: Path
    train: Path
    dev: Path
    batch_sizes: tuple[int, ...]
    candidates: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reports: dict = field(default_factory=dict)

    @property
    def adapter(self) -> Path:
        return self.work / "adapter"

    @property
    def folded(self) -> Path:
        return self.work / "folded"


def make_adapter(ci: _CI) -> None:
    """A few fine-tuning steps (sample routing), or a seeded random adapter without lily_deploy.training."""
    if ci.args.finetune_steps > 0 and have("lily_deploy.training"):
        from lily_deploy.training import finetune

        res = finetune(model="minilm", train=ci.train, val=None, output=ci.adapter, rank=8, num_hp=4, lp_stride=2,
                       scale=1.0, targets=["query", "value"], max_steps=ci.args.finetune_steps, batch_size=16,
                       lr=1e-2, max_length=64, routing="sample", train_size=ci.args.finetune_steps * 16, seed=0,
                       progress=False, log=lambda m: None)
        ci.notes.append(f"adapter: {res.steps} fine-tuning steps (batch 16, sample routing) on sst2/train.tsv")
    else:
        random_adapter(ci.adapter)
        ci.notes.append("adapter: seeded random-but-nonzero PEFT-Lily (r 8, 4 HPs, LP stride 2, query+value)")


def fold_adapter(ci: _CI) -> None:
    from lily_deploy.folding import fold

    rep = fold(source=ci.adapter, output=ci.folded, calib=str(ci.train), strategy="auto", size=64, batch_size=32,
               max_length=64, progress=False)
    ci.notes.append(f"fold auto: {len(rep.folded)} of {len(rep.layers)} layers folded "
                    f"({rep.metric_name} {rep.metric_before:.2f} -> {rep.metric_after:.2f} on 64 train rows)")


def export_graphs(ci: _CI) -> None:
    """The adapter with sample and with batch routing, and the folded checkpoint."""
    from lily_deploy.core.errors import LilyDeployError
    from lily_deploy.onnx_export import export_onnx

    graphs = {"lily.onnx": (ci.adapter, "sample"), "lily_batch.onnx": (ci.adapter, "batch"),
              "folded.onnx": (ci.folded, "sample")}
    for name, (src, routing) in graphs.items():
        r = export_onnx(source=src, output=ci.work / name, routing=routing)
        if not r.passed:
            raise LilyDeployError(f"export of {name} failed its validation:\n{r.table()}")
    ci.candidates += [ci.work / "lily.onnx", ci.work / "lily_batch.onnx"]


def need_precision(ci: _CI) -> Optional[str]:
    if not have("lily_deploy.precision"):
        return "lily_deploy.precision is not installed; no FP16/INT8 candidates"
    return None


def quantize_graphs(ci: _CI) -> None:
    """FP16 and INT8 (Q/DQ) from the sample-routing graph; kept for parity even when their own check fails."""
    from lily_deploy.precision import quantize

    for prec in ("fp16", "int8"):
        dst = ci.work / f"lily.{prec}.onnx"
        q = quantize(model_path=ci.work / "lily.onnx", output=dst, precision=prec,
                     calib=str(ci.train) if prec == "int8" else None, val=str(ci.train) if prec == "fp16" else None,
                     calib_size=128, val_size=128, model=str(ci.adapter), cache_dir=None, keep_on_failure=True,
                     progress=False, max_length=64)
        if not q.passed:
            ci.notes.append(f"quantize {prec}: its own validation failed (file kept for parity)")
        ci.candidates.append(dst)


def need_tensorrt_rtx(ci: _CI) -> Optional[str]:
    if not (have("lily_deploy.trt_build") and have("tensorrt_rtx")):
        return "TensorRT for RTX (tensorrt_rtx) or lily_deploy.trt_build is not installed"
    return None


def build_engine_sm89(ci: _CI) -> None:
    """An engine for sm89, ahead of time (TensorRT for RTX builds without a GPU)."""
    from lily_deploy.trt_build import build_engine

    engine = ci.work / "lily.plan"
    build_engine(onnx_path=ci.work / "lily.onnx", output=engine, backend="tensorrt-rtx", compute_capabilities=["sm89"],
                 max_shapes=["input_ids:8x128,attention_mask:8x128,token_type_ids:8x128"],
                 min_shapes=["input_ids:1x1,attention_mask:1x1,token_type_ids:1x1"],
                 opt_shapes=["input_ids:8x64,attention_mask:8x64,token_type_ids:8x64"], progress=False)
    ci.candidates.append(engine)


def check_parity(ci: _CI) -> None:
    """The adapter against every candidate, and the folded checkpoint against its graph."""
    from lily_deploy.parity_check import run_parity
    from lily_deploy.report import write_reports

    runs = {"parity": (ci.adapter, ci.candidates), "parity-folded": (ci.folded, [ci.work / "folded.onnx"])}
    for name, (ref, cands) in runs.items():
        report = run_parity(reference=ref, candidates=cands, data=ci.dev, limit=ci.args.rows,
                            batch_sizes=ci.batch_sizes, max_length=128, threads=ci.args.threads, progress=False)
        write_reports(report.to_json(), report.markdown(), ci.out / name)
        ci.reports[name] = report
        say("")
        say(f"== {name}: reference {Path(ref).name}, first {ci.args.rows} rows of {ci.dev}")
        say(report.table())
        say(report.final_line())


STAGES = (  # run by the quickstart's runner, lily_deploy.pipeline.run_stages
    Stage("adapter", make_adapter),
    Stage("fold", fold_adapter),
    Stage("export", export_graphs),
    Stage("quantize", quantize_graphs, skip=need_precision),
    Stage("build-trt", build_engine_sm89, skip=need_tensorrt_rtx),
    Stage("parity", check_parity),
)


class CILog(StageLog):
    """A line with its time after each stage that ran; a note for each stage skipped."""

    def __init__(self, ci: _CI, timings: dict[str, float]):
        self.ci, self.timings = ci, timings

    def finished(self, stage: Stage, seconds: float) -> None:
        self.timings[stage.name] = round(seconds, 1)
        say(f"[{self.timings[stage.name]:6.1f} s] {stage.name}")

    def skipped(self, stage: Stage, reason: str) -> None:
        self.ci.notes.append(f"{stage.name}: {reason}")


def _summary(ci: _CI, passed: bool, total: float, timings: dict) -> dict:
    """``OUT/summary.json``: per run and candidate, the status and the worst agreement, delta and error."""
    def candidate(c):
        return {"name": c.name, "precision": c.precision, "routing": c.routing, "status": c.status,
                "reason": c.reason, "agreement": min((b.agreement for b in c.batches), default=None),
                "metric_delta": min((b.metric_delta for b in c.batches), default=None),
                "max_abs": max((b.outputs["logits"]["max_abs"] for b in c.batches), default=None)}

    return {
        "schema_version": 1, "kind": "ci-parity", "passed": passed, "seconds": total, "timings": timings,
        "data": f"first {ci.args.rows} rows of {ci.dev}", "notes": ci.notes,
        "runs": {name: {"passed": r.passed, "summary": r.summary(), "report": str(ci.out / name / "parity.json"),
                        "candidates": [candidate(c) for c in r.candidates]}
                 for name, r in ci.reports.items()},
    }


def _arguments(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "ci"), help="Report folder (default: out/ci).")
    ap.add_argument("--rows", type=int, default=1000, help="Rows of sst2/dev.tsv compared (the first N).")
    ap.add_argument("--batch-sizes", default="8", help="Batch sizes of the comparison (comma list).")
    ap.add_argument("--finetune-steps", type=int, default=40, help="Fine-tuning steps (0: seeded random adapter).")
    ap.add_argument("--threads", type=int, default=None, help="torch/onnxruntime threads (default: all cores).")
    ap.add_argument("--keep", action="store_true", help="Keep the models in OUT/work.")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _arguments(argv)
    dev, train = DATA / "dev.tsv", DATA / "train.tsv"
    if not dev.is_file() or not train.is_file():
        say(f"SKIPPED | ci parity: real data {DATA} is not here")
        return 0
    import torch

    from lily_deploy.core.errors import LilyDeployError
    from lily_deploy.core.fileio import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work" if args.keep else Path(tempfile.mkdtemp(prefix="lily-ci-"))
    if args.keep:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    if args.threads:
        torch.set_num_threads(args.threads)
    ci = _CI(args, work, out, train, dev, tuple(int(b) for b in args.batch_sizes.split(",") if b.strip()))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        run_stages(STAGES, ci, CILog(ci, timings))
    except LilyDeployError as exc:
        say(f"FAILED | ci parity: {exc}")
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    passed = all(ci.reports.values())
    total = round(time.perf_counter() - started, 1)
    write_json(out / "summary.json", _summary(ci, passed, total, timings))
    say("")
    for n in ci.notes:
        say(f"note: {n}")
    say(f"wrote {out / 'summary.json'}, {out / 'parity'}/, {out / 'parity-folded'}/")
    say(f"{'PASSED' if passed else 'FAILED'} | ci parity: "
        + "; ".join(f"{k}: {r.summary()}" for k, r in ci.reports.items()) + f" | {total:.0f} s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
