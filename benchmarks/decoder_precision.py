"""Decoder precision on onnxruntime CPU: decode tokens/s of fp32, fp16, int8 and int4, file sizes, and what each costs.

    python benchmarks/decoder_precision.py                              # Llama, hidden 768, 4 layers, batch 1 and 4
    python benchmarks/decoder_precision.py --hidden 1024 --layers 6 --json out/decoder_precision.json

A random LlamaForCausalLM (the packaged MiniLM tokenizer's 30,522-word vocabulary, nothing
downloaded) gets a random non-zero Lily adapter on q/v/down projections and is exported with its
KV cache and ``prompt`` routing (``export_onnx``, validated against torch). ``lily_deploy.precision.
quantize`` then writes each precision -- the same library call as ``lily-deploy quantize`` --
calibrating on real SST-2 review prompts and validating on held-out ones against the fp32 graph:
greedy-token agreement (teacher-forced on fp32's continuation) and response perplexity. The
models are random, so perplexity is near the vocabulary size and the agreement is a lower bound
(near-flat logits flip on any rounding); the numbers compare methods, they say nothing of a
trained model's quality.

Timing: one iteration per graph is a prefill of ``--prompt-len`` tokens and ``--new-tokens``
cached greedy steps through :class:`~lily_deploy.runtime.decoder_ort.OrtDecoder`; after
``--warmup`` untimed iterations the graphs take turns call by call (the first rotating, the order
reversed every other cycle: ``benchmarks/decoder_latency.py``'s scheme), medians over ``--iters``.
decode tokens/s = batch / step time; ratios are to fp32 at the same batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
warnings.filterwarnings("ignore")

from decoder_latency import cpu_name, log, save_base  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
TIMED = ("fp32", "fp16", "int8", "int4", "int4 + embedding")
# name -> quantize() fields; those in TIMED (and fp32) are timed
VARIANTS = {
    "fp16": {"precision": "fp16"},
    "int8": {"precision": "int8", "int8_target": "onnxruntime"},
    "int4": {"precision": "int4", "int4_method": "rtn", "int4_target": "onnxruntime"},
    "int8 (tensorrt form)": {"precision": "int8", "int8_target": "tensorrt"},
    "int4 hqq": {"precision": "int4", "int4_method": "hqq", "int4_target": "onnxruntime"},
    "int4 gptq": {"precision": "int4", "int4_method": "gptq", "int4_target": "onnxruntime"},
    "int4 (tensorrt form)": {"precision": "int4", "int4_method": "rtn", "int4_target": "tensorrt"},
    "int4 + embedding": {"precision": "int4", "int4_method": "rtn", "int4_target": "onnxruntime",
                         "int4_embedding": True},
}
TARGET_RATIO = 1.5  # int4 decode tokens/s >= this x fp32


def prompts_file(path: Path, n: int, skip: int = 0) -> Path:
    """SST-2 dev reviews as ``Review: ...\\nSentiment:`` prompts with their label as the response."""
    from lily_deploy.core.data import read_text_table

    table = read_text_table(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv", limit=2000)
    rows = [(t, l) for t, l in zip(table.texts, table.labels) if 3 <= len(t.split()) <= 20][skip:skip + n]
    path.write_text("".join(json.dumps({"prompt": f"Review: {t}\nSentiment:",
                                        "response": " positive" if str(l) in ("1", "positive") else " negative"}) + "\n"
                            for t, l in rows))
    return path


def build(work: Path, args) -> dict:
    """The fp32 export and every quantized variant, with their validations (reused when present)."""
    from lily_deploy.core.adapters import random_lily_adapter
    from lily_deploy.onnx_export import export_onnx
    from lily_deploy.precision import quantize

    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "built.json"
    settings = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "rank",
                                               "num_hp", "block_size", "calib_size", "val_size", "val_tokens")}
    if stamp.is_file() and not args.rebuild:
        saved = json.loads(stamp.read_text())
        if saved["settings"] == settings:
            log(f"reusing the graphs in {work} (--rebuild makes them again)")
            return saved
    calib = prompts_file(work / "calib.jsonl", args.calib_size)  # every variant: the same held-out prompts
    val = prompts_file(work / "val.jsonl", args.val_size, skip=args.calib_size)
    base = save_base(work / "base", args)
    adapter = random_lily_adapter(str(base), work / "adapter", TARGETS, task="causal-lm", rank=args.rank,
                                  num_hp=args.num_hp, lp_stride=2, scale=1.0)
    fp32 = work / "fp32.onnx"
    log("exporting the fp32 decoder ...")
    if not export_onnx(source=adapter, output=fp32, routing="prompt").passed:
        sys.exit("the fp32 export failed its validation")
    graphs = {"fp32": {"onnx": str(fp32), "bytes": fp32.stat().st_size}}
    for name, fields in VARIANTS.items():
        log(f"quantizing {name} ...")
        out = work / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
        t = time.perf_counter()
        result = quantize(model_path=fp32, output=out, calib=calib, calib_size=None, val=val, val_size=None,
                          new_tokens=args.val_tokens, block_size=args.block_size, min_token_agreement=0,
                          max_ppl_increase=1e9, keep_on_failure=True, cache_dir=None, progress=False, **fields)
        graphs[name] = {"onnx": str(out), "bytes": out.stat().st_size, "quantize_s": round(time.perf_counter() - t, 1),
                        "validation": result.validation.to_json(), "fields": fields}
    saved = {"settings": settings, "graphs": graphs}
    stamp.write_text(json.dumps(saved, indent=2) + "\n")
    return saved


def measure(decoders: dict, batch: int, args) -> dict:
    import numpy as np

    from lily_deploy.decoder_bench import measure as measure_prompt  # the loop `lily-deploy bench` runs
    from lily_deploy.generation import left_pad

    rng = np.random.default_rng(batch)
    prompt = left_pad(rng.integers(1000, 30000, (batch, args.prompt_len)).tolist(), 0)
    return measure_prompt(decoders, prompt, args.new_tokens, args.warmup, args.iters, base="fp32")


def report(args, built: dict, results: dict) -> bool:
    import onnxruntime as ort

    g = built["graphs"]
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); onnxruntime {ort.__version__} CPU, {args.threads} "
          f"threads; prompt {args.prompt_len}, {args.new_tokens} decode steps, {args.warmup} warm-up + {args.iters} "
          "timed iterations, interleaved, medians")
    print(f"decoder: random Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), "
          f"intermediate {args.intermediate}, vocab 30522; Lily r {args.rank}, E {args.num_hp} on "
          f"{','.join(TARGETS)}, prompt routing\n")
    print("| precision | batch | prefill ms | decode tokens/s | x fp32 (p25-p75) | file MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for batch, per in results.items():
        for n, r in per.items():
            print(f"| {n} | {batch} | {r['prefill_ms']:.1f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_ratio']:.2f} "
                  f"({r['ratio_p25']:.2f}-{r['ratio_p75']:.2f}) | {g[n]['bytes'] / 1e6:.1f} |")
    print(f"\nquality against fp32 ({args.val_size} held-out prompts, {args.val_tokens} new tokens; random model):\n")
    print("| variant | file MB | token agreement | continuations identical | ppl fp32 | ppl | ppl increase |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n, info in g.items():
        if n == "fp32":
            continue
        v = info["validation"]
        ppl = "-" if v["ppl_fp32"] is None else f"{v['ppl_fp32']:.0f} | {v['ppl']:.0f} | {v['ppl_increase_percent']:+.2f}%"
        print(f"| {n} | {info['bytes'] / 1e6:.1f} | {100 * v['token_agreement']:.1f}% | "
              f"{100 * v['continuations_identical']:.1f}% | {ppl} |")
    cells, met = [], True
    for batch, per in results.items():
        ratio = per["int4"]["tokens_per_s_ratio"]
        met &= ratio >= TARGET_RATIO
        cells.append(f"batch {batch} {ratio:.2f} ({'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    print(f"\ntarget: int4 decode tokens/s >= {TARGET_RATIO} x fp32: " + ", ".join(cells))
    return met


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("out/decoder_precision"))
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-hp", type=int, default=4)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--calib-size", type=int, default=16, help="calibration prompts (int8, gptq)")
    p.add_argument("--val-size", type=int, default=16, help="held-out validation prompts")
    p.add_argument("--val-tokens", type=int, default=16, help="greedy tokens per validation prompt")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from lily_deploy.runtime.decoder_ort import OrtDecoder

    built = build(args.work, args)
    decoders = {n: OrtDecoder(built["graphs"][n]["onnx"], threads=args.threads) for n in TIMED}
    log(f"timing {', '.join(TIMED)} at batch {args.batch_sizes} ...")
    results = {b: measure(decoders, b, args) for b in args.batches}
    met = report(args, built, results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu_name(), "settings": built["settings"], "graphs": built["graphs"],
                                         "results": {str(b): r for b, r in results.items()},
                                         "target": {"ratio": TARGET_RATIO, "met": met}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
