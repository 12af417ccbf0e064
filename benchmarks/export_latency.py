"""onnxruntime latency of base MiniLM vs MiniLM+Lily exported naively, through ``lily-deploy export``
(sample routing, lily::HPMix), and folded; and the base and the Lily model fused for onnxruntime
(``export --optimize onnxruntime``: Attention / MultiHeadAttention, SkipLayerNorm, BiasGelu) -- in one
interleaved run, medians, ratios to the base and to each row's own reference (a fused Lily graph
against the fused base), with the per-round ratios. The row "base fused, split q/k/v" is the fused base
with its packed Attention unpacked into q/k/v MatMuls + MultiHeadAttention, the form the fused Lily graph
must take: what the unpacking alone costs. Three experimental rows rewrite the Lily graphs
(``merge_lp_router``): each layer's LP and router as one GEMM (raw and fused), and the base projection,
LP and router as one GEMM (raw), each checked against the graph it comes from before anything is timed.

    python benchmarks/export_latency.py                # r 32, E 4, LP stride 2 on query,value
    python benchmarks/export_latency.py --adapter DIR  # your own MiniLM adapter
    python benchmarks/export_latency.py --workdir W --reuse --rounds 7   # rerun on the graphs kept in W

The Lily adapter is random but non-zero (as after training): latency does not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from benchmarks.ort_profile import add_graph_args, interleaved_rounds, minilm_feeds  # noqa: E402  (after the path insert)


def export_naive(adapter: Path, out: Path) -> Path:
    """The PEFT forward traced as is (Einsum and all), the way a user would export without lily-deploy."""
    import onnx
    import torch

    from lily_deploy.core.adapters import load_adapter

    peft_model, base, _ = load_adapter(adapter)

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    ids = torch.randint(100, 1000, (2, 16))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
    prog = torch.onnx.export(Wrapper(peft_model).eval(), args, dynamo=True, input_names=["input_ids", "attention_mask",
                             "token_type_ids"], output_names=["logits"],
                             dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: s}), verbose=False)
    onnx.save_model(prog.model_proto, str(out))
    return out


def merge_lp_router(src: Path, out: Path, into_base: bool = False) -> Path:
    """Experimental: each layer's LP and router in one GEMM, ``[h, logits] = x [A; R A]^T`` then Split.

    ``h R^T = x (R A)^T``, so the router's MatMul on ``h`` becomes extra columns of the LP's
    MatMul on ``x``. ``into_base`` (raw graphs): the base projection's ``x W0^T`` too, one GEMM per
    adapted layer. Not (yet) a stage of ``export``: these rows measure what the rewrite is worth.
    """
    from lily_deploy.graph_optimize import adapter_term_adds
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}

    def weight(name):  # an initializer, or the Transpose of one (shared LPs keep a Transpose node)
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Transpose" and node.input[0] in inits:
            return numpy_helper.to_array(inits[node.input[0]]).T
        return None

    # a router: MatMul(h, R^T) whose output goes to a Softmax (the HPMix node, or its inlined body in a
    # fused graph) and whose h is the LP's MatMul(x, A^T); attention's MatMul(q, k^T) has no constant weight
    routers = []
    for n in graph.node:
        if n.domain == "lily" and len(n.input) > 1:
            routers.append(producer.get(n.input[1]))
        elif n.op_type == "Softmax" and n.input[0] in producer:
            routers.append(producer[n.input[0]])
    term_adds = adapter_term_adds(graph)  # the base projection of each Lily term, found before any rewrite
    merged = 0
    for k, router in enumerate(r for r in routers if r is not None and r.op_type == "MatMul"):
        lp = producer.get(router.input[0])
        if lp is None or lp.op_type != "MatMul":
            continue
        a_t, r_t = weight(lp.input[1]), weight(router.input[1])
        if a_t is None or r_t is None:
            continue
        name = f"lily_merged_lp_router_{k}"
        blocks, outs, base = [a_t, a_t @ r_t], [lp.output[0], router.output[0]], None
        if into_base:  # the projection MatMul(x, W0^T) under the Add that takes this layer's term
            term = next(n.output[0] for n in graph.node if n.domain == "lily" and n.input[1] == router.output[0])
            proj = term_adds[term][2]
            base = producer.get(proj)
            w0 = weight(base.input[1]) if base is not None and base.input[0] == lp.input[0] else None
            if w0 is None:
                continue
            blocks, outs = [w0] + blocks, [proj] + outs
        graph.initializer.append(numpy_helper.from_array(np.concatenate(blocks, 1).astype(a_t.dtype), name))
        graph.initializer.append(numpy_helper.from_array(np.array([b.shape[1] for b in blocks], np.int64), name + "_split"))
        at = min(list(graph.node).index(n) for n in (lp, base) if n is not None)
        graph.node.insert(at, helper.make_node("Split", [name + "_out", name + "_split"], outs, axis=-1,
                                               name=name + "_split"))
        graph.node.insert(at, helper.make_node("MatMul", [lp.input[0], name], [name + "_out"], name=name))
        graph.node.remove(lp)
        graph.node.remove(router)
        if base is not None:
            graph.node.remove(base)
        merged += 1
    onnx.save_model(model, str(out))
    what = "W0 + LP + router" if into_base else "LP + router"
    print(f"{out.name}: {what} of {merged} layers merged into one GEMM each", file=sys.stderr)
    return out


# the row each row is compared with (besides the base): a fused Lily graph against the fused base
REFERENCE = {"base fused": "base", "lily-deploy fused": "base fused", "lily-deploy fused LP+router": "base fused",
             "base fused, split q/k/v": "base fused"}
# the rewritten graphs must give their source's logits
REWRITTEN_FROM = {"lily-deploy LP+router GEMM": "lily-deploy (sample, HPMix)",
                  "lily-deploy fused LP+router": "lily-deploy fused",
                  "lily-deploy W0+LP+router GEMM": "lily-deploy (sample, HPMix)",
                  "base fused, split q/k/v": "base fused"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_graph_args(ap)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=40, help="timed runs per model and round at batch 1 (fewer at larger batches)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is over all of them")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="keep graphs already in --workdir (same adapter and settings)")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort

    from lily_deploy.runtime.ort import ort_session

    from lily_deploy.onnx_export import export_onnx
    from lily_deploy.folding import fold
    from benchmarks.ort_profile import attention_as_mha

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lily-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from lily_deploy.core.adapters import random_lily_adapter

    adapter = args.adapter or (work / "adapter" if args.reuse and (work / "adapter").exists() else None)
    adapter = adapter or random_lily_adapter("minilm", work / "adapter", ["query", "value"], num_labels=2,
                                             rank=args.rank, num_hp=args.num_hp, lp_stride=args.stride)
    print(f"building graphs in {work} ...", file=sys.stderr)
    paths = {
        "base": work / "base.onnx",
        "lily naive (PEFT as is)": work / "naive.onnx",
        "lily-deploy (sample, HPMix)": work / "lily.onnx",
        "lily-deploy folded": work / "folded.onnx",
        "base fused": work / "base.fused.onnx",
        "lily-deploy fused": work / "lily.fused.onnx",
        "base fused, split q/k/v": work / "base-mha.fused.onnx",
        "lily-deploy LP+router GEMM": work / "lily.merged.onnx",
        "lily-deploy fused LP+router": work / "lily.fused.merged.onnx",
        "lily-deploy W0+LP+router GEMM": work / "lily.merged-base.onnx",
    }
    builders = {
        "base": lambda p: export_onnx(source="minilm", output=p, validation=False),
        "lily naive (PEFT as is)": lambda p: export_naive(adapter, p),
        "lily-deploy (sample, HPMix)": lambda p: export_onnx(source=adapter, output=p, routing="sample"),
        "lily-deploy folded": lambda p: (fold(source=adapter, output=work / "folded_ckpt", strategy="all",
                                              random_inputs=True, size=8, progress=False),
                                         export_onnx(source=work / "folded_ckpt", output=p)),
        # fused for onnxruntime (export --optimize onnxruntime), validated against torch like every export
        "base fused": lambda p: export_onnx(source="minilm", output=p, optimize="onnxruntime"),
        "lily-deploy fused": lambda p: export_onnx(source=adapter, output=p, routing="sample", optimize="onnxruntime"),
        # the fused base with its packed Attention as q/k/v MatMuls + MultiHeadAttention, the structure the
        # fused Lily graph must have (its q and v projections take the term): what unpacking costs
        "base fused, split q/k/v": lambda p: attention_as_mha(paths["base fused"], p),
        # experimental rewrite of the two graphs above (checked against them below)
        "lily-deploy LP+router GEMM": lambda p: merge_lp_router(paths["lily-deploy (sample, HPMix)"], p),
        "lily-deploy fused LP+router": lambda p: merge_lp_router(paths["lily-deploy fused"], p),
        "lily-deploy W0+LP+router GEMM": lambda p: merge_lp_router(paths["lily-deploy (sample, HPMix)"], p,
                                                                  into_base=True),
    }
    for name, build in builders.items():
        if not (args.reuse and paths[name].exists()):
            build(paths[name])

    sessions = {k: ort_session(p, threads=args.threads) for k, p in paths.items()}
    rng = np.random.default_rng(0)
    check_ids = np.random.default_rng(1).integers(1000, 20000, (2, 16)).astype(np.int64)  # timed inputs unchanged
    check = {"input_ids": check_ids, "attention_mask": np.ones_like(check_ids), "token_type_ids": np.zeros_like(check_ids)}
    check["attention_mask"][1, 10:] = 0
    for new, old in REWRITTEN_FROM.items():
        err = float(np.abs(sessions[new].run(None, check)[0] - sessions[old].run(None, check)[0]).max())
        print(f"{new}: max |logits - {old}| = {err:.2e}", file=sys.stderr)
        if err > 1e-4:
            sys.exit(f"{new}: the rewrite changed the logits by {err:.2e}")
    results = {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        feeds = minilm_feeds(rng, bs, args.seq_len)
        times = {k: [] for k in sessions}
        ratios = {k: [] for k in sessions}
        ref_ratios = {k: [] for k in sessions}
        iters = max(10, args.iters // max(1, bs // 2))
        for round_times in interleaved_rounds(sessions, feeds, args.warmup, iters, args.rounds):
            for k, v in round_times.items():
                times[k].extend(v)
                ratios[k].append(statistics.median(v) / statistics.median(round_times["base"]))
                ref_ratios[k].append(statistics.median(v) / statistics.median(round_times[REFERENCE.get(k, "base")]))
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        results[bs] = {k: {"median_ms": med[k], "ratio_to_base": med[k] / med["base"],
                           "reference": REFERENCE.get(k, "base"),
                           "ratio_to_reference": med[k] / med[REFERENCE.get(k, "base")],
                           "round_ratios": [round(r, 4) for r in ratios[k]],
                           "round_ratios_to_reference": [round(r, 4) for r in ref_ratios[k]]} for k in med}

    from lily_deploy.report import cpu_name

    cpu = cpu_name() or platform.machine()
    print(f"\nonnxruntime {ort.__version__}, {args.threads} threads, sequence {args.seq_len}, CPU: {cpu}")
    print(f"Lily r {args.rank}, E {args.num_hp}, LP stride {args.stride} on query,value"
          + (f" (adapter {args.adapter})" if args.adapter else " (random non-zero adapter)"))
    print(f"medians over {args.rounds} interleaved rounds; 'vs ref' is the ratio to the row's reference "
          "(fused rows: base fused; others: base), with its per-round ratios, which show the noise")
    header = f"| {'model':<30} |" + "".join(f" batch {bs} ms | / base | vs ref | per-round vs ref |"
                                            for bs in results)
    print(header)
    print("|" + "-" * 32 + "|" + "------------|--------|--------|------------------|" * len(results))
    for k in paths:
        row = f"| {k:<30} |"
        for bs in results:
            r = results[bs][k]
            rr = " ".join(f"{x:.3f}" for x in r["round_ratios_to_reference"])
            row += f" {r['median_ms']:10.2f} | {r['ratio_to_base']:6.3f} | {r['ratio_to_reference']:6.3f} | {rr:<16} |"
        print(row)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "threads": args.threads, "cpu": cpu,
                                         "seq_len": args.seq_len}, indent=2))


if __name__ == "__main__":
    main()
