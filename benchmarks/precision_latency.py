"""onnxruntime CPU latency and accuracy of the fp32, fp16 and int8 graphs of one model, in one interleaved run.

    python benchmarks/precision_latency.py --fp32 model.onnx [--fused model.ort.onnx] [--int8 model.int8.onnx]

Graphs not given are made with ``lily_deploy.precision`` (what ``lily-deploy quantize`` runs; int8
calibrated on 256 rows of --calib, default ../shared/data/sst2/train.tsv) into --workdir, each
validated against its fp32 graph on --val (default: all 6,735 rows of sst2/dev.tsv); the
accuracies are printed under the latency table. Graphs: ``fp16``; ``int8`` (quantize's default
for a plain export: the TensorRT form, symmetric int8 activations, MatMuls whose input SQNR is
below 18 dB kept fp32); ``int8-nosqnr`` (the same with ``--min-sqnr 0``, the old default);
``int8-ort`` (``--int8-target onnxruntime``, uint8 activations); with ``--fused`` (the model
exported with ``--optimize onnxruntime``) also ``fp32-fused`` and ``int8-ort-fused``.

Inputs are full-length sequences (random token ids, attention mask all ones; random normal floats
for float inputs) at each batch size. Sessions use --threads intra-op threads at
ORT_ENABLE_ALL (as lily-deploy's own sessions), where Q/DQ pairs run as int8 kernels. On x86
onnxruntime fuses int8 (S8S8) activations only where it can first turn them into uint8, which it
cannot for a tensor read by several MatMuls (q/k/v/LP all read one input), so the TensorRT form
mostly runs as float MatMuls between Q/DQ pairs (``--qdq-int8-allowed`` fuses them anyway, into
S8S8 kernels). After warm-up, rounds interleave the graphs (order rotated each round) so a noisy,
shared CPU affects all alike; the table gives medians and ratios to fp32, and the CPU's ISA flags
(AVX2/AVX-512/VNNI decide int8 speed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": [], "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and info["model"] in ("", platform.machine(), platform.processor()):
            info["model"] = value.strip()
        if key == "flags":
            flags = set(value.split())
            info["flags"] = [f for f in ISA_FLAGS if f in flags]
            break
    return info


def make_inputs(session, batch: int, seq: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [batch if (d is None or isinstance(d, str)) and k == 0 else
                 seq if (d is None or isinstance(d, str)) else int(d) for k, d in enumerate(i.shape)]
        if "float" in i.type:
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        elif i.name == "input_ids":
            feeds[i.name] = rng.integers(1000, 30000, size=shape, dtype=np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones(shape, np.int64)
        else:
            feeds[i.name] = np.zeros(shape, np.int64)
    return feeds


def session(path: Path, threads: int, level: str, int8_allowed: bool = False):
    """The project's onnxruntime session (as export, quantize, parity and bench use it) at ``level``."""
    from lily_deploy.runtime.ort import ort_session

    # x86: fuse S8S8 Q/DQ MatMuls into int8 kernels (off by default, see lily_deploy.precision)
    extra = {"session.qdqisint8allowed": "1"} if int8_allowed else None
    return ort_session(path, threads=threads, opt_level=level, config=extra)


# name -> (precision, quantize fields, made from the fused graph); "int8" is quantize's default for a plain export
MADE = {
    "fp16": ("fp16", {}, False),
    "int8": ("int8", {"int8_target": "tensorrt"}, False),
    "int8-nosqnr": ("int8", {"int8_target": "tensorrt", "min_sqnr": 0.0}, False),
    "int8-ort": ("int8", {"int8_target": "onnxruntime"}, False),
    "int8-ort-fused": ("int8", {}, True),
}


def ensure_graphs(args) -> tuple[dict[str, Path], dict[str, dict]]:
    """The graphs to time and, for those made here, their validation against fp32 on --val."""
    graphs = {"fp32": Path(args.fp32)}
    if args.fused:
        graphs["fp32-fused"] = Path(args.fused)
    validations = {}
    work = Path(args.workdir)
    for name, (precision, kw, fused) in MADE.items():
        given = getattr(args, name.replace("-", "_"), None)
        if given:
            graphs[name] = Path(given)
            continue
        if fused and not args.fused:
            continue
        from lily_deploy.precision import quantize
        from lily_deploy.runtime.onnx_io import load_onnx, metadata

        source = Path(args.fused if fused else args.fp32)
        work.mkdir(parents=True, exist_ok=True)
        out = work / f"{Path(args.fp32).stem}.{name}.onnx"
        if not out.exists():
            print(f"making {out} ...", file=sys.stderr)
            r = quantize(model_path=source, output=out, precision=precision, calib=args.calib, val=args.val,
                         val_size=args.val_size, max_accuracy_drop=100, progress=False, **kw)
            print(r.table(), file=sys.stderr)
        info = json.loads(metadata(load_onnx(out)).get("lily_deploy.quantization", "{}"))
        if info.get("validation"):
            validations[name] = info["validation"]
        graphs[name] = out
    return graphs, validations


def measure(graphs: dict[str, Path], batches, seq: int, threads: int, level: str, warmup: int, rounds: int,
            reps: int, int8_allowed: bool = False) -> dict:
    sessions = {name: session(p, threads, level, int8_allowed) for name, p in graphs.items()}
    names = list(sessions)
    results = {}
    for b in batches:
        feeds = {n: make_inputs(s, b, seq) for n, s in sessions.items()}
        for n, s in sessions.items():
            for _ in range(warmup):
                s.run(None, feeds[n])
        times = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                s, f = sessions[n], feeds[n]
                for _ in range(reps):
                    t = time.perf_counter()
                    s.run(None, f)
                    times[n].append((time.perf_counter() - t) * 1000)
        results[b] = {n: {"median_ms": statistics.median(v), "p10_ms": _q(v, 0.1), "p90_ms": _q(v, 0.9),
                          "runs": len(v)} for n, v in times.items()}
    return results


def _q(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fp32", required=True, help="the fp32 ONNX (an export)")
    p.add_argument("--fp16", default=None, help="its fp16 graph (default: made with lily_deploy.precision)")
    p.add_argument("--int8", default=None, help="its int8 Q/DQ graph, TensorRT form (default: made here)")
    p.add_argument("--int8-ort", default=None, help="its int8 Q/DQ graph, onnxruntime form (default: made here)")
    p.add_argument("--fused", default=None,
                   help="the same model exported with --optimize onnxruntime: adds fp32-fused and int8-ort-fused")
    p.add_argument("--calib", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"),
                   help="calibration data for graphs made here (256 seeded rows)")
    p.add_argument("--val", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"),
                   help="validation data: each made graph's accuracy against fp32")
    p.add_argument("--val-size", type=int, default=None, help="validation rows (default: all)")
    p.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out"), help="where made graphs go")
    p.add_argument("--batch", default="1,8", help="batch sizes (comma-separated)")
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("--opt-level", choices=["extended", "all"], default="all",
                   help="onnxruntime graph optimisation (lily-deploy's sessions run at all)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    p.add_argument("--reps", type=int, default=3, help="runs per precision per round")
    p.add_argument("--qdq-int8-allowed", action="store_true",
                   help="set onnxruntime's session.qdqisint8allowed=1 (x86 default 0): S8S8 Q/DQ MatMuls then "
                        "fuse into int8 kernels (which run slower than U8S8 on x86)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import onnxruntime as ort

    graphs, validations = ensure_graphs(args)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    cpu = cpu_info()
    results = measure(graphs, batches, args.seq, args.threads, args.opt_level, args.warmup, args.rounds, args.reps,
                      args.qdq_int8_allowed)
    flags = set(cpu["flags"])
    vnni = "yes" if flags & {"avx512_vnni", "avx_vnni"} else "no"
    print(f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs); ISA: {' '.join(cpu['flags']) or 'unknown'}")
    print(f"     AVX2 {'yes' if 'avx2' in flags else 'no'}, AVX-512 {'yes' if 'avx512f' in flags else 'no'}, "
          f"VNNI {vnni}")
    print(f"onnxruntime {ort.__version__} CPU, {args.threads} threads, ORT_ENABLE_{args.opt_level.upper()}, "
          f"session.qdqisint8allowed={1 if args.qdq_int8_allowed else 0}, sequence {args.seq}, {args.warmup} warm-up runs, {args.rounds} interleaved rounds x {args.reps} runs; "
          "medians (p10-p90)")
    names = list(graphs)
    header = f"{'batch':>5}  " + "  ".join(f"{n:>28}" for n in names)
    print(header)
    for b, per in results.items():
        base = per["fp32"]["median_ms"]
        cells = []
        for n in names:
            m = per[n]
            ratio = "" if n == "fp32" else f" x{m['median_ms'] / base:.2f}"
            cells.append(f"{m['median_ms']:8.1f} ms ({m['p10_ms']:.0f}-{m['p90_ms']:.0f}){ratio}".rjust(28))
        print(f"{b:>5}  " + "  ".join(cells))
    if validations:
        first = next(iter(validations.values()))
        print(f"\naccuracy on {first['data']} ({first['rows']} rows), fp32 {first['accuracy_fp32']:.2f}%:")
        for n, v in validations.items():
            print(f"  {n:>16}: {v['accuracy']:.2f}%  drop {v['drop_points']:+.2f} points  "
                  f"top-1 agreement {100 * v['top1_agreement']:.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "onnxruntime": ort.__version__, "threads": args.threads,
                                               "opt_level": args.opt_level, "seq": args.seq,
                                               "graphs": {k: str(v) for k, v in graphs.items()},
                                               "validation": validations,
                                               "results": {str(k): v for k, v in results.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
