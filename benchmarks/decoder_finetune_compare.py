"""Lily vs LoRA on a pretrained decoder: the packaged MiniLM as a causal LM, SST-2 classified by generation.

    python benchmarks/decoder_finetune_compare.py                        # 1 seed, 300 steps
    python benchmarks/decoder_finetune_compare.py --seeds 0,1,2 --json out/decoder_compare.json

No decoder weights can be downloaded here, so the pretrained model is all-MiniLM-L6-v2 loaded as
``BertLMHeadModel`` with ``is_decoder=True`` (causal attention, a KV cache; its LM head transform
is new and trains with the adapter). Each SST-2 row becomes a prompt ``Review: ...\\nSentiment:``
with the response `` positive`` / `` negative`` (loss on the response only). Both methods train
through the same ``lily_deploy.training.finetune`` loop on the same rows, steps and seed; LoRA's
rank is matched to Lily's trainable adapter parameters on the same targets. Both are scored once,
after the last step, on SST-2 dev by the loop's response-token accuracy: the response is one
token, so that is the share of rows whose greedy first generated token is the label (Lily routed
as trained, ``prompt``). The Lily adapter is then also run through the deploy path,
``lily_deploy.generation.generate`` (torch, KV cache), on the same rows, a row counting when the
generated word is the label's: the two Lily figures must agree. Prints one table: parameters and
dev accuracy per seed, mean and spread.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "sst2"
WORDS = {"1": "positive", "0": "negative"}


def read_rows(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(s.strip(), l.strip()) for s, l in (line.split("\t") for line in lines if "\t" in line)]


def prompt_of(sentence: str) -> str:
    return f"Review: {sentence}\nSentiment:"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"prompt": prompt_of(s), "response": " " + WORDS[l]}) + "\n"
                            for s, l in rows), encoding="utf-8")
    return path


def accuracy_by_generation(adapter: Path, rows, batch_size: int) -> float:
    """Share of rows whose greedily generated first word is the label's word."""
    from lily_deploy.generation import generate

    result = generate(model=str(adapter), prompts=[prompt_of(s) for s, _ in rows], max_new_tokens=2,
                      backend="torch", batch_size=batch_size)
    hits = sum((g.text.split() or [""])[0] == WORDS[l] for g, (_, l) in zip(result.rows, rows))
    return hits / len(rows)


def run_one(method: str, seed: int, args, files: dict, work: Path) -> dict:
    from lily_deploy.training import finetune

    out = work / f"{method}-{seed}"
    t0 = time.perf_counter()
    result = finetune(model="minilm", task="causal-lm", train=str(files["train"]), val=str(files["dev"]),
                      output=str(out), method=method, rank=args.rank, num_hp=args.num_hp, lp_stride=args.lp_stride,
                      scale=args.scale, lr=args.lr if method == "lily" else (args.lora_lr or args.lr),
                      max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, seed=seed,
                      eval_every=args.steps, save_every=args.steps, device="cpu",
                      progress=not args.quiet, overwrite=True, targets=args.targets.split(","))
    train_s = time.perf_counter() - t0
    r = result.as_dict()
    generated = accuracy_by_generation(out, files["dev_rows"], args.batch_size) if method == "lily" else None
    return {"method": method, "seed": seed, "dev_accuracy": r["best_val_accuracy"], "generate_accuracy": generated,
            "trainable_params": r["trainable_params"], "adapter_params": r["adapter_params"],
            "lora_rank": r.get("lora_rank"), "train_s": train_s}


def summary(runs: list[dict], method: str) -> tuple[float, float, list[float]]:
    accs = [r["dev_accuracy"] for r in runs if r["method"] == method]
    return statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0), accs


def table(runs: list[dict]) -> str:
    lines = ["| method | adapter params | trainable (with head) | dev accuracy per seed | mean | spread (sd) |"
             " by generate() |", "|---|---:|---:|---|---:|---:|---|"]
    for method in ("lily", "lora"):
        first = next(r for r in runs if r["method"] == method)
        mean, sd, accs = summary(runs, method)
        gen = ", ".join(f"{r['generate_accuracy']:.4f}" for r in runs if r["method"] == method
                        and r["generate_accuracy"] is not None) or "-"
        name = "Lily" if method == "lily" else f"LoRA (r {first['lora_rank']})"
        lines.append(f"| {name} | {first['adapter_params']:,} | {first['trainable_params']:,} | "
                     f"{', '.join(f'{a:.4f}' for a in accs)} | {mean:.4f} | {sd:.4f} | {gen} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each trains both methods")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=9600, help="seeded subset of SST-2 train rows")
    p.add_argument("--dev-size", type=int, default=0, help="SST-2 dev rows to score (0: all)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-hp", type=int, default=4)
    p.add_argument("--lp-stride", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--targets", default="query,value")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lora-lr", type=float, default=None, help="LoRA's learning rate (default: --lr)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    for path in (DATA / "train.tsv", DATA / "dev.tsv"):
        if not path.exists():
            sys.exit(f"data {path} is not here (SST-2 lives in ../shared/data/sst2 beside the project)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    train = read_rows(DATA / "train.tsv")
    random.Random(0).shuffle(train)
    dev = read_rows(DATA / "dev.tsv")
    dev = dev[:args.dev_size] if args.dev_size else dev
    runs = []
    with tempfile.TemporaryDirectory(prefix="decoder_compare.") as tmp:
        work = Path(tmp)
        files = {"train": write_jsonl(work / "train.jsonl", train[:args.train_size]),
                 "dev": write_jsonl(work / "dev.jsonl", dev),
                 "dev_rows": dev}
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in ("lily", "lora"):
                runs.append(run_one(method, seed, args, files, work))
                r = runs[-1]
                print(f"{method} seed {seed}: dev accuracy {r['dev_accuracy']:.4f} "
                      f"({r['train_s']:.0f} s training)", file=sys.stderr, flush=True)
    print(f"\nMiniLM as a causal LM (BertLMHeadModel, is_decoder) on SST-2, classified by greedy generation: "
          f"{args.steps} steps x batch {args.batch_size}, {args.train_size} training rows, {len(dev)} dev rows, "
          f"max length {args.max_length}; Lily r {args.rank}, {args.num_hp} HPs, LP stride {args.lp_stride}, "
          f"scale {args.scale}, targets {args.targets}, prompt routing, lr {args.lr:g}; "
          f"LoRA lr {args.lora_lr or args.lr:g}")
    print(table(runs))
    lily, lora = summary(runs, "lily")[0], summary(runs, "lora")[0]
    print(f"Lily - LoRA: {100 * (lily - lora):+.2f} points (mean over {len(runs) // 2} seed(s))")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
