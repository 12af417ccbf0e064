"""Where the dynamic-Lily overhead goes: onnxruntime's profiler, per op type, base vs Lily, raw and fused.

    python benchmarks/ort_profile.py                      # MiniLM, random r 32 / E 4 / stride 2 Lily on query,value
    python benchmarks/ort_profile.py --adapter DIR        # your own MiniLM adapter
    python benchmarks/ort_profile.py --workdir W          # keep (and reuse) the exported graphs in W

Exports the base MiniLM and the Lily model twice each through ``lily-deploy export``: as is
(``--optimize none``, what TensorRT gets) and fused (``--optimize onnxruntime``), every graph
validated against torch. Then runs the four sessions with ``SessionOptions.enable_profiling``,
interleaved run by run, and prints per op type the kernel time per run (median over runs) of
the base and of the Lily model, their ratio and difference, plus the whole run (``model_run``)
and the time outside kernels; and the fused Lily model against the fused base with its packed
Attention unpacked into q/k/v MatMuls + MultiHeadAttention (``base-mha``: the structure the fused
Lily graph has), which separates the adapter's cost from the unpacking's. The Lily ``lily::HPMix`` bodies are inlined by onnxruntime, so
their MatMul / Softmax / ReduceSum / ... land in those op types; the node counts show how many
nodes each op type has in each graph. A second table splits the MatMuls by shape, with the GMAC/s each
kind reaches in the Lily graph: the adapter's small GEMMs against the base projections.

Sessions are created here rather than through ``runtime.ort.ort_session`` (which has no
profiling switch), with the same settings: ORT_ENABLE_ALL, threads spinning only while a run lasts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

VARIANTS = ("raw", "fused")


def build_graphs(adapter: Path | None, work: Path, args) -> dict[tuple[str, str], Path]:
    """(model, variant) -> exported ONNX; graphs already in ``work`` are reused."""
    from lily_deploy.core.adapters import random_lily_adapter
    from lily_deploy.onnx_export import export_onnx

    if adapter is None:
        adapter = work / "adapter"
        if not adapter.exists():
            random_lily_adapter("minilm", adapter, ["query", "value"], num_labels=2, rank=args.rank,
                                num_hp=args.num_hp, lp_stride=args.stride)
    sources = {"base": "minilm", "lily": adapter}
    paths = {}
    for model, source in sources.items():
        for variant in VARIANTS:
            path = work / f"{model}.{variant}.onnx"
            if not path.exists():
                print(f"exporting {model} ({variant}) ...", file=sys.stderr)
                export_onnx(source=source, output=path, optimize="onnxruntime" if variant == "fused" else "none")
            paths[(model, variant)] = path
    paths[("base-mha", "fused")] = attention_as_mha(paths[("base", "fused")], work / "base-mha.fused.onnx")
    return paths


def attention_as_mha(src: Path, out: Path) -> Path:
    """The fused base with each packed ``Attention`` split into q, k, v MatMuls + ``MultiHeadAttention``.

    That is the structure the fused Lily graph has (its projections stay apart so the Lily term can
    enter them), so base-mha vs lily separates what the adapter costs from what unpacking costs.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph, inits = model.graph, {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    nodes = []
    for node in graph.node:
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        packed = producer.get(node.input[1])
        if packed is not None and packed.op_type == "Concat":  # the fuser packs the weights at run time
            weights = list(packed.input)
        else:
            w = numpy_helper.to_array(inits[node.input[1]])
            sizes = list(attrs.get("qkv_hidden_sizes") or [w.shape[1] // 3] * 3)
            weights = []
            for tag, part in zip("qkv", np.split(w, np.cumsum(sizes)[:-1], axis=1)):
                weights.append(f"{node.output[0]}.{tag}.weight")
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(part), weights[-1]))
        qkv = [f"{node.output[0]}.{tag}" for tag in "qkv"]
        nodes += [helper.make_node("MatMul", [node.input[0], w], [o]) for w, o in zip(weights, qkv)]
        bias = node.input[2] if len(node.input) > 2 else ""
        mask = node.input[5] if len(node.input) > 5 else ""
        nodes.append(helper.make_node("MultiHeadAttention", qkv + [bias, "", mask], list(node.output[:1]),
                                      domain="com.microsoft", num_heads=attrs["num_heads"]))
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Concat" or any(o in used for o in n.output)]  # the packed weights
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save_model(model, str(out))
    return out


def profiled_session(path: Path, threads: int, prefix: Path):
    import onnxruntime as ort

    from lily_deploy.runtime.ort import SPIN_IN_RUN

    so = ort.SessionOptions()
    so.log_severity_level = 3
    for key, value in SPIN_IN_RUN.items():
        so.add_session_config_entry(key, value)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_profiling = True
    so.profile_file_prefix = str(prefix)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def per_run_op_times(profile_file: str, warmup: int) -> tuple[list[dict[str, float]], dict[str, int], list[float]]:
    """Kernel microseconds per op type for each timed run, node counts per op type, and each run's total."""
    events = json.loads(Path(profile_file).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    runs = runs[warmup:]
    per_run = [defaultdict(float) for _ in runs]
    nodes = defaultdict(set)
    starts = [r[0] for r in runs]
    import bisect

    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        k = bisect.bisect_right(starts, e["ts"]) - 1
        if k < 0 or e["ts"] > runs[k][1]:
            continue  # a warm-up run
        op = e.get("args", {}).get("op_name", "?")
        per_run[k][op] += e["dur"]
        nodes[op].add(e["name"])
        if op == "MatMul":  # MatMuls also by shape: which GEMMs the adapter adds and how fast each kind runs
            key = f"MatMul {_shapes(e['args'].get('input_type_shape'))} -> {_shapes(e['args'].get('output_type_shape'))}"
            per_run[k][key] += e["dur"]
            nodes[key].add(e["name"])
    return per_run, {op: len(v) for op, v in nodes.items()}, [b - a for a, b in runs]


def _shapes(typed) -> str:
    """``[{"float": [1, 128, 384]}, ...]`` (the profiler's shapes) as ``1x128x384, ...``."""
    return ", ".join("x".join(str(d) for d in next(iter(t.values()))) for t in (typed or []))


def minilm_feeds(rng, batch: int, seq_len: int) -> dict:
    """MiniLM inputs: ``batch`` rows of ``seq_len`` random token ids drawn from ``rng``, no padding."""
    import numpy as np

    ids = rng.integers(1000, 20000, (batch, seq_len)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def interleaved_rounds(sessions: dict, feeds: dict, warmup: int, iters: int, rounds: int) -> list[dict]:
    """Per round, each session's call times in seconds: ``warmup`` calls each, then ``rounds`` of ``iters``
    turns in which every session runs once, the one going first rotating, so all see the same machine."""
    import time

    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    order = list(sessions)
    out = []
    for _ in range(rounds):
        times = {k: [] for k in sessions}
        for i in range(iters):
            for k in order[i % len(order):] + order[:i % len(order)]:
                t = time.perf_counter()
                sessions[k].run(None, feeds)
                times[k].append(time.perf_counter() - t)
        out.append(times)
    return out


def profile(paths: dict, batch: int, args, work: Path) -> dict:
    """Run every session ``args.runs`` times (after warm-up), interleaved; return per-op medians in ms."""
    import numpy as np

    feeds = minilm_feeds(np.random.default_rng(0), batch, args.seq_len)
    sessions = {key: profiled_session(p, args.threads, work / f"prof_b{batch}_{key[0]}_{key[1]}")
                for key, p in paths.items()}
    order = list(sessions)
    for i in range(args.warmup + args.runs):
        for key in order[i % len(order):] + order[:i % len(order)]:  # rotate who goes first
            sessions[key].run(None, feeds)
    out = {}
    for key, sess in sessions.items():
        per_run, nodes, totals = per_run_op_times(sess.end_profiling(), args.warmup)
        ops = sorted({op for r in per_run for op in r})
        med = {op: statistics.median(r.get(op, 0.0) for r in per_run) / 1000 for op in ops}
        kernels = statistics.median(sum(t for op, t in r.items() if not op.startswith("MatMul ")) for r in per_run) / 1000
        out[key] = {"ops": med, "nodes": nodes, "run_ms": statistics.median(totals) / 1000, "kernels_ms": kernels}
    return out


def print_table(batch: int, variant: str, res: dict, reference: str = "base") -> None:
    base, lily = res[(reference, variant)], res[("lily", variant)]
    ops = sorted((op for op in set(base["ops"]) | set(lily["ops"]) if not op.startswith("MatMul ")),
                 key=lambda op: -(lily["ops"].get(op, 0) - base["ops"].get(op, 0)))
    print(f"\nbatch {batch}, {variant} graphs ({'--optimize onnxruntime' if variant == 'fused' else 'as exported'})"
          f", lily vs {reference}; ms per run, median; sorted by what Lily adds")
    print(f"| op type | {reference} ms (nodes) | lily ms (nodes) | lily/{reference} | lily-{reference} ms |")
    print("|---|---:|---:|---:|---:|")
    for op in ops:
        b, l = base["ops"].get(op, 0.0), lily["ops"].get(op, 0.0)
        ratio = f"{l / b:.3f}" if b else "new"
        print(f"| {op} | {_cells(base, lily, op)} | {ratio} | {l - b:+.3f} |")
    for label, key in (("all kernels", "kernels_ms"), ("model_run", "run_ms")):
        print(f"| **{label}** | {base[key]:.3f} | {lily[key]:.3f} | {lily[key] / base[key]:.3f} "
              f"| {lily[key] - base[key]:+.3f} |")
    outside = (base["run_ms"] - base["kernels_ms"], lily["run_ms"] - lily["kernels_ms"])
    print(f"| outside kernels | {outside[0]:.3f} | {outside[1]:.3f} | | {outside[1] - outside[0]:+.3f} |")
    shapes = sorted((op for op in set(base["ops"]) | set(lily["ops"]) if op.startswith("MatMul ")),
                    key=lambda op: -lily["ops"].get(op, 0))
    print(f"\nMatMul by input shapes -> output shape, batch {batch}, {variant}: ms per run (nodes), and GMAC/s")
    print(f"| MatMul | {reference} ms (nodes) | lily ms (nodes) | lily GMAC/s |")
    print("|---|---:|---:|---:|")
    for op in shapes:
        l = lily["ops"].get(op, 0.0)
        rate = f"{lily['nodes'].get(op, 0) * _macs(op) / l / 1e6:.1f}" if l else "-"
        print(f"| {op[len('MatMul '):]} | {_cells(base, lily, op)} | {rate} |")


def _cells(base: dict, lily: dict, op: str) -> str:
    """``ms (nodes) | ms (nodes)`` of one op type (or MatMul shape) in the reference and the Lily graph."""
    return " | ".join(f"{r['ops'].get(op, 0.0):.3f} ({r['nodes'].get(op, 0)})" for r in (base, lily))


def _macs(key: str) -> int:
    """Multiply-adds of one MatMul from its shape key (``a x b x M x K, ... x K x N -> ... x M x N``)."""
    ins, out = key[len("MatMul "):].split(" -> ")
    k = int(ins.split(", ")[0].split("x")[-1])
    total = 1
    for d in out.split("x"):
        total *= int(d)
    return total * k


def cpu_name() -> str:
    import platform

    from lily_deploy.report import cpu_name as proc_cpu_name

    return proc_cpu_name() or platform.machine()


def add_graph_args(ap: argparse.ArgumentParser) -> None:
    """The flags every MiniLM benchmark here shares: the adapter (or a random one's size), batches, sequence, threads."""
    ap.add_argument("--adapter", type=Path, default=None, help="a MiniLM Lily adapter (default: a random one)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--num-hp", type=int, default=4)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_graph_args(ap)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20, help="profiled runs per graph at batch 1 (fewer at larger batches)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import onnxruntime as ort

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lily-prof-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = build_graphs(args.adapter, work, args)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, sequence {args.seq_len}, CPU: {cpu_name()}")
    print(f"Lily r {args.rank}, E {args.num_hp}, LP stride {args.stride} on query,value"
          + (f" (adapter {args.adapter})" if args.adapter else " (random non-zero adapter)"))
    dump = {}
    runs = args.runs
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        args.runs = max(6, runs // max(1, batch // 2))
        res = profile(paths, batch, args, work)
        print(f"\n## batch {batch}: {args.runs} profiled runs per graph, interleaved")
        for variant in VARIANTS:
            print_table(batch, variant, res)
        print_table(batch, "fused", res, "base-mha")  # the fused base unpacked as the Lily graph is
        dump[batch] = {f"{m}.{v}": r for (m, v), r in res.items()}
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "seq_len": args.seq_len,
                                         "results": dump}, indent=2, default=list))


if __name__ == "__main__":
    main()
