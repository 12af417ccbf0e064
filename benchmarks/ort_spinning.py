"""onnxruntime's thread spinning, A/B in one interleaved run: the runtime layer's setting against spinning off.

    python benchmarks/ort_spinning.py                  # MiniLM base and Lily (r 32, E 4, stride 2), raw and fused
    python benchmarks/ort_spinning.py --workdir W      # keep (and reuse) the exported graphs in W

``lily_deploy.runtime.ort`` creates every session with ``SPIN_IN_RUN``: intra-op threads spin while a
run lasts and stop when it returns. The alternative is spinning off
(``session.intra_op.allow_spinning=0``): idle threads sleep, and every op that splits its work wakes
one. A dynamic Lily graph has about eight small ops per adapted layer, so it pays that wake-up more
often than the base does. Each graph gets one session of each kind; all sessions take turns call by
call (rotating who goes first), so both settings see the same machine. Medians per round and over
all rounds, the ratio of each session to the base graph's session with spinning off, and each
setting's Lily / base ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from benchmarks.ort_profile import add_graph_args, interleaved_rounds, minilm_feeds  # noqa: E402  (after the path insert)

SETTINGS = {"in-run": None, "off": {"session.intra_op.allow_spinning": "0"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_graph_args(ap)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20, help="timed calls per session and round at batch 1 (fewer at larger batches)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort

    from benchmarks.ort_profile import build_graphs, cpu_name
    from lily_deploy.runtime.ort import ort_session

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lily-spin-"))
    work.mkdir(parents=True, exist_ok=True)
    graphs = {f"{model} {variant}": path for (model, variant), path in build_graphs(args.adapter, work, args).items()
              if model in ("base", "lily")}
    sessions = {}
    for name, path in graphs.items():
        for setting, override in SETTINGS.items():
            # the runtime layer's session; "off" overrides its spinning entries
            sessions[(name, setting)] = ort_session(path, threads=args.threads, config=override)
    order = list(sessions)
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, sequence {args.seq_len}, CPU: {cpu_name()}")
    print("spinning 'in-run': allow_spinning=1, force_spinning_stop=1 (the runtime layer's); 'off': allow_spinning=0")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        feeds = minilm_feeds(rng, batch, args.seq_len)
        iters = max(5, args.iters // max(1, batch // 2))
        rounds = {k: [] for k in sessions}
        for times in interleaved_rounds(sessions, feeds, args.warmup, iters, args.rounds):
            for k, v in times.items():
                rounds[k].append(1000 * statistics.median(v))
        ref = ("base raw", "off")
        print(f"\nbatch {batch}: {args.rounds} rounds x {iters} calls per session; ratio to 'base raw' with spinning off")
        print("| graph | spinning | median ms | / base raw, off | per-round |")
        print("|---|---|---:|---:|---|")
        med = {k: statistics.median(v) for k, v in rounds.items()}
        for k in order:
            per = " ".join(f"{a / b:.3f}" for a, b in zip(rounds[k], rounds[ref]))
            print(f"| {k[0]} | {k[1]} | {med[k]:.2f} | {med[k] / med[ref]:.3f} | {per} |")
        for variant in ("raw", "fused"):
            line = ", ".join(f"{setting} {med[(f'lily {variant}', setting)] / med[(f'base {variant}', setting)]:.3f}"
                             for setting in SETTINGS)
            print(f"Lily / base, {variant}: {line}")


if __name__ == "__main__":
    main()
