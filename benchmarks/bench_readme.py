"""The README's latency table: MiniLM base vs MiniLM+Lily vs folded, torch eager and onnxruntime, one run.

    python benchmarks/bench_readme.py                      # writes out/bench/bench.{json,md,png}
    python benchmarks/bench_readme.py --batch-sizes 1,8,32 --seq-lens 32,128 --iters 50

It makes the three models (a seeded random-but-nonzero PEFT-Lily adapter, r 32, 4 HPs, LP stride 2
on query and value -- latency does not depend on the values; its fold with ``--fold all``; and the
base), exports each with ``lily-deploy export``, then runs and prints the one command that measures
them all, interleaved::

    lily-deploy bench base=minilm lily=ADAPTER folded=FOLDED base=base.onnx lily=lily.onnx \
        folded=folded.onnx --base base --report-dir out/bench ...
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def make_adapter(out: Path, rank: int = 32, num_hp: int = 4, stride: int = 2) -> Path:
    from lily_deploy.core.adapters import random_lily_adapter

    return random_lily_adapter("minilm", out, ["query", "value"], num_labels=2, rank=rank, num_hp=num_hp,
                               lp_stride=stride, labels=["0", "1"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"), help="Report folder (models go to OUT/models).")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--seq-lens", default="128")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rebuild", action="store_true", help="Re-make the models even if OUT/models has them.")
    args = ap.parse_args(argv)

    out = Path(args.out)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    adapter, folded = models / "adapter", models / "folded"
    onnx = {name: models / f"{name}.onnx" for name in ("base", "lily", "folded")}
    if args.rebuild or not all(p.exists() for p in [adapter, folded, *onnx.values()]):
        from lily_deploy.onnx_export import export_onnx
        from lily_deploy.folding import fold

        make_adapter(adapter)
        print("adapter: random-but-nonzero PEFT-Lily on MiniLM (r 32, 4 HPs, LP stride 2, query+value)", flush=True)
        fold(source=adapter, output=folded, strategy="all", random_inputs=True, size=64, progress=False)
        print("folded: every layer (--fold all)", flush=True)
        for name, src, routing in (("base", "minilm", "sample"), ("lily", adapter, "sample"),
                                   ("folded", folded, "sample")):
            export_onnx(source=src, output=onnx[name], routing=routing)
            print(f"exported {onnx[name]}", flush=True)
    cmd = ["lily-deploy", "bench", "base=minilm", f"lily={adapter}", f"folded={folded}", f"base={onnx['base']}",
           f"lily={onnx['lily']}", f"folded={onnx['folded']}", "--base", "base", "--batch-sizes", args.batch_sizes,
           "--seq-lens", args.seq_lens, "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--report-dir", str(out), "--markdown"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    exe = Path(sys.executable).with_name("lily-deploy")
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    return subprocess.call([str(exe) if exe.exists() else "lily-deploy", *cmd[1:]], env=env)


if __name__ == "__main__":
    sys.exit(main())
