"""onnxruntime CPU latency of a decoder with and without Lily: prefill ms and decode tokens/s, in one interleaved run.

    python benchmarks/decoder_latency.py                       # Llama, hidden 256, 4 layers, batch 1 and 4
    python benchmarks/decoder_latency.py --hidden 512 --layers 8 --json out/decoder_latency.json

Four graphs are exported with ``lily_deploy.onnx_export.export_onnx`` (KV cache and routing state,
validated against torch) from a tiny-but-real random LlamaForCausalLM (the packaged MiniLM
tokenizer's vocabulary) and a random non-zero Lily adapter on every attention and MLP projection:
the base decoder itself, Lily with ``prompt`` routing, Lily with ``causal`` routing, and Lily
folded (every layer static, so a plain decoder again). All of it goes into ``--work``; a second
run with the same settings reuses it (``--rebuild`` makes it again). Latency does not depend on
the adapter's values, only on its shapes.

Each timed call goes through :class:`lily_deploy.runtime.decoder_ort.OrtDecoder` (the decoder
``generate`` uses). One iteration per model is a prefill of ``--prompt-len`` tokens (timed: prefill
ms) and then ``--new-tokens`` greedy single-token steps with the cache (each step timed; the
iteration's decode ms/token is their mean). After ``--warmup`` untimed iterations the models take
turns call by call -- every model's prefill, then every model's first step, ... -- and the model
that goes first rotates each iteration (the order reversing every other cycle), so a noisy shared
CPU slows all of them alike. The folded graph has exactly the base's operators and shapes, so its
ratio to the base shows the noise floor of the run. The table
gives medians over ``--iters`` iterations; decode tokens/s = batch / step time; ratios are to the
base at the same batch (``tok/s x base`` also gives the spread of the per-iteration paired ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its pool: spinning threads starve ORT
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = ("base", "lily prompt", "lily causal", "lily folded")
TARGET_RATIO = 0.95  # Lily prompt decode tokens/s must be >= this x the base's
STAMP = "settings.json"
FOLD_PROMPTS = ["the film was", "a long , slow and rather dull evening at the cinema , but", "great",
                "i wanted to like it", "an instant classic , from the first scene to the last"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# ---- the models ------------------------------------------------------------------------------

def build_settings(args) -> dict:
    """What the generated models depend on: a change in any of these makes them again."""
    return {"architecture": "LlamaForCausalLM", "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
            "kv_heads": args.kv_heads, "intermediate": args.intermediate, "max_positions": args.max_positions,
            "rank": args.rank, "num_hp": args.num_hp, "lp_stride": args.stride, "targets": TARGETS, "seed": 0}


def save_base(folder: Path, args) -> Path:
    """A random LlamaForCausalLM of the requested size with the packaged MiniLM tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lily_deploy.core.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_positions,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def folded_checkpoint(adapter: Path, out: Path) -> dict:
    """Every Lily layer static: ``fold(strategy="all")`` on random inputs, or (if that fails) by hand.

    Returns how it was made, and the error of ``fold`` if it failed.
    """
    from lily_deploy.folding import fold

    try:
        report = fold(source=adapter, output=out, strategy="all", random_inputs=True, size=16, batch_size=8,
                      progress=False)
        return {"method": "lily_deploy.folding.fold(strategy='all', random_inputs=True)",
                "folded_layers": len(report.folded), "layers": len(report.layers)}
    except Exception as exc:  # the library's answer is part of what this benchmark reports
        error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        log(f"fold(strategy='all') failed on the causal LM: {error}; folding by hand instead")
    return {**fold_by_hand(adapter, out), "fold_error": error}


def fold_by_hand(adapter: Path, out: Path) -> dict:
    """Freeze every layer at its mean ``prompt`` routing vector over a few prompts (from the routing state)."""
    import numpy as np

    from lily_deploy.core.data import prompt_ids
    from lily_deploy.core.deploy import load_model, save_deploy
    from lily_deploy.generation import left_pad, special_ids
    from lily_deploy.runtime.decoder import TorchDecoder

    model = load_model(adapter, mode="prompt")
    decoder = TorchDecoder(model, "fold")
    _, pad = special_ids(model.tokenizer)
    ids, mask, pos = left_pad([prompt_ids(model.tokenizer, p) for p in FOLD_PROMPTS], pad)
    _, cache = decoder.step(ids, mask, pos, decoder.start(len(FOLD_PROMPTS)))
    for name, layer in model.layers.items():
        state = cache.routing[name].numpy()  # [B, E + 1]: masked sum of router probabilities, token count
        p = (state[:, :-1] / np.maximum(state[:, -1:], 1.0)).mean(0)
        layer.set_static(p / p.sum())
    save_deploy(model, out, extra={"fold": {"strategy": "all (by hand)", "routing": "prompt",
                                            "prompts": len(FOLD_PROMPTS)}})
    return {"method": "load_model + set_static(mean prompt routing vector) + save_deploy",
            "folded_layers": len(model.layers), "layers": len(model.layers)}


def export(source: Path, out: Path, routing=None) -> dict:
    """One validated decoder export; stop the benchmark if onnxruntime and torch disagree."""
    from lily_deploy.onnx_export import export_onnx

    t = time.perf_counter()
    result = export_onnx(source=source, output=out, routing=routing)
    if not result.passed:
        sys.exit(f"export of {source} failed validation:\n{result.table()}")
    return {"onnx": str(out), "routing": result.routing, "dynamic_layers": result.dynamic_layers,
            "folded_layers": result.folded_layers, "validation": "passed", "tokens_checked": result.tokens_checked,
            "notes": result.notes, "export_s": round(time.perf_counter() - t, 1)}


def build(work: Path, args) -> dict:
    """The four exported decoders in ``work`` (made again only when the settings changed or asked)."""
    from lily_deploy.core.adapters import random_lily_adapter

    settings = build_settings(args)
    stamp = work / STAMP
    if not args.rebuild and stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("settings") == settings and all(Path(m["onnx"]).is_file() for m in saved["models"].values()):
            log(f"reusing the graphs in {work} (--rebuild makes them again)")
            return saved
    work.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    log(f"building a random Llama ({args.hidden} hidden, {args.layers} layers) and its Lily adapter in {work} ...")
    base = save_base(work / "base", args)
    adapter = random_lily_adapter(str(base), work / "adapter", TARGETS, task="causal-lm", rank=args.rank,
                                  num_hp=args.num_hp, lp_stride=args.stride, scale=1.0)
    fold_info = folded_checkpoint(adapter, work / "folded")
    models = {}
    for name, source, routing, file in (("base", base, None, "base.onnx"), ("lily prompt", adapter, "prompt", "prompt.onnx"),
                                        ("lily causal", adapter, "causal", "causal.onnx"),
                                        ("lily folded", work / "folded", None, "folded.onnx")):
        log(f"exporting {name} ...")
        models[name] = export(source, work / file, routing)
    saved = {"settings": settings, "models": models, "fold": fold_info}
    stamp.write_text(json.dumps(saved, indent=2) + "\n")
    return saved


# ---- the timing ------------------------------------------------------------------------------

def measure(decoders: dict, batch: int, args) -> dict:
    """Medians (and per-iteration ratios to the base) of prefill and decode-step time at one batch size."""
    import numpy as np

    from lily_deploy.decoder_bench import measure as measure_prompt  # the loop `lily-deploy bench` runs
    from lily_deploy.generation import left_pad

    rng = np.random.default_rng(batch)
    vocab = min(d.vocab_size for d in decoders.values())
    prompt = left_pad(rng.integers(1000, vocab, (batch, args.prompt_len)).tolist(), 0)
    return measure_prompt(decoders, prompt, args.new_tokens, args.warmup, args.iters, base="base")


# ---- the report ------------------------------------------------------------------------------

def table(results: dict) -> str:
    lines = ["| model | batch | prefill ms | prefill x base | decode ms/token | decode tokens/s | tok/s x base "
             "(p25-p75) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for batch, per in results.items():
        for n, r in per.items():
            lines.append(f"| {n} | {batch} | {r['prefill_ms']:.2f} | {r['prefill_ratio']:.3f} | "
                         f"{r['decode_ms_per_token']:.3f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_ratio']:.3f} "
                         f"({r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}) |")
    return "\n".join(lines)


def target_line(results: dict) -> tuple[str, bool]:
    cells, met = [], True
    for batch, per in results.items():
        ratio = per["lily prompt"]["tokens_per_s_ratio"]
        met &= ratio >= TARGET_RATIO
        cells.append(f"batch {batch} {ratio:.3f} ({'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    return f"target: Lily prompt decode tokens/s >= {TARGET_RATIO} x base: " + ", ".join(cells), met


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("out/decoder_latency"), help="where the models and graphs go")
    p.add_argument("--rebuild", action="store_true", help="make the models and graphs again even if --work has them")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 688/256 x hidden)")
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-hp", type=int, default=4)
    p.add_argument("--stride", type=int, default=2, help="LP stride (adjacent layers sharing one LP)")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps per iteration (timed)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per batch size")
    p.add_argument("--iters", type=int, default=16,
                   help="timed iterations per batch size (a multiple of 8 balances the orders); tables give medians")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    args.intermediate = args.intermediate or int(round(args.hidden * 688 / 256 / 8)) * 8
    args.batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.batches or min(args.batches) < 1 or min(args.iters, args.new_tokens, args.prompt_len) < 1:
        p.error("batch sizes, --iters, --new-tokens and --prompt-len must be >= 1")
    if args.prompt_len + args.new_tokens > args.max_positions:
        p.error(f"--prompt-len + --new-tokens exceeds --max-positions {args.max_positions}")
    return args


def print_report(args, built: dict, vocab: int, results: dict, timed_s: float) -> bool:
    """The settings, the markdown table and the target line; whether the target is met."""
    import onnxruntime as ort

    fold = built["fold"]
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs)")
    print(f"onnxruntime {ort.__version__} CPUExecutionProvider, {args.threads} intra-op threads, ORT_ENABLE_ALL, "
          "threads spin only while a run lasts (lily_deploy.runtime.ort settings)")
    print(f"decoder: random LlamaForCausalLM, hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} kv), intermediate {args.intermediate}, vocab {vocab}; Lily r {args.rank}, E "
          f"{args.num_hp}, LP stride {args.stride} on {','.join(TARGETS)} (random non-zero)")
    print(f"folded: {fold['method']} ({fold['folded_layers']}/{fold['layers']} layers)"
          + (f"; fold() failed: {fold['fold_error']}" if "fold_error" in fold else ""))
    print(f"prompt {args.prompt_len} tokens, then {args.new_tokens} greedy steps with the cache; {args.warmup} "
          f"warm-up + {args.iters} timed iterations per batch, models interleaved call by call (first rotating, "
          f"order reversed every other cycle); medians; timing took {timed_s:.0f} s")
    print()
    print(table(results))
    line, met = target_line(results)
    print("\nlily folded runs the base's graph (same operators and shapes): its ratios to the base are the noise floor")
    print(line)
    return met


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort

    from lily_deploy.runtime.decoder_ort import OrtDecoder

    built = build(args.work, args)
    decoders = {n: OrtDecoder(built["models"][n]["onnx"], threads=args.threads) for n in MODELS}
    log(f"timing {', '.join(MODELS)} at batch {', '.join(map(str, args.batches))} ...")
    t = time.perf_counter()
    results = {b: measure(decoders, b, args) for b in args.batches}
    timed_s = time.perf_counter() - t
    met = print_report(args, built, decoders["base"].vocab_size, results, timed_s)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "onnxruntime": ort.__version__,
            "threads": args.threads, "opt_level": "all", "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "warmup": args.warmup, "iters": args.iters, "timing_s": round(timed_s, 1), "model": built["settings"],
            "fold": built["fold"], "exports": built["models"], "target": {"ratio": TARGET_RATIO, "met": met},
            "results": {str(b): r for b, r in results.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
