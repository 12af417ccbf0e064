"""Switchable Lily adapters on onnxruntime (CPU), MiniLM: one base graph, many adapters, in one run.

    python benchmarks/switchable_bench.py                 # r 16, E 4, LP stride 2 on query,value
    python benchmarks/switchable_bench.py --threads 2 --rounds 30

Measures, interleaved (warm-up first, medians):
  * switching adapters on one session (load an .onnx_adapter + the next run) vs loading a second full session;
  * latency of the switchable graph (adapter active through RunOptions) vs the baked-in export of the same adapter;
  * a batch of 8 rows with one adapter vs each row its own adapter (one run per row);
  * resident memory for 1, 4 and 16 adapters on one base session vs one baked-in session per adapter
    (each in a fresh process; the separate graphs are copies of the baked-in export: a session's memory
    does not depend on the adapter's values).
The adapters are random but non-zero (as after training), each packed with ``lily-deploy adapter pack``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def cpu_name() -> str:
    from lily_deploy.report import cpu_name as proc_cpu_name

    return proc_cpu_name() or platform.machine()


def prepare(work: Path, n_adapters: int, rank: int, num_hp: int, stride: int) -> dict:
    """Adapters, the switchable base (from adapter 0), the baked-in export of adapter 0, and packed adapters."""
    from lily_deploy.core.adapters import random_lily_adapter
    from lily_deploy.onnx_export import export_onnx
    from lily_deploy.switchable import pack_adapter

    adapters = [random_lily_adapter("minilm", work / f"ad{k}", ["query", "value"], num_labels=2, rank=rank,
                                    num_hp=num_hp, lp_stride=stride, scale=2.0, seed=k) for k in range(n_adapters)]
    base, baked = work / "base.onnx", work / "baked0.onnx"
    export_onnx(source=adapters[0], output=base, switchable=True)
    export_onnx(source=adapters[0], output=baked)
    packed = [pack_adapter(adapter=a, graph=base, output=work / f"ad{k}.onnx_adapter").path
              for k, a in enumerate(adapters)]
    return {"adapters": adapters, "base": base, "baked": baked, "packed": packed}


def inputs(batch: int, seq: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def latency(files: dict, threads: int, rounds: int, per_round: int, batch: int, seq: int) -> dict:
    """Interleaved medians (ms): baked-in, switchable with one adapter, switchable alternating two adapters."""
    from lily_deploy.runtime.ort import OrtAdapter, OrtRunner

    feeds = inputs(batch, seq)
    baked = OrtRunner(files["baked"], threads)
    switch = OrtRunner(files["base"], threads)
    a, b = (OrtAdapter(p) for p in files["packed"][:2])
    calls = {"baked-in export": baked.bind(feeds), "switchable, adapter A": switch.bind(feeds, adapter=a)}
    alternate = [switch.bind(feeds, adapter=a), switch.bind(feeds, adapter=b)]
    calls["switchable, A/B alternating"] = lambda: [f() for f in alternate]
    times: dict[str, list[float]] = {k: [] for k in calls}
    for f in calls.values():  # warm-up
        for _ in range(3):
            f()
    for _ in range(rounds):
        for name, f in calls.items():
            n = per_round if "alternating" not in name else max(1, per_round // 2)
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            per_call = (time.perf_counter() - t0) / (n * (2 if "alternating" in name else 1))
            times[name].append(per_call * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def mixed_batch(files: dict, threads: int, rounds: int, rows: int, seq: int) -> dict:
    """Medians (ms per batch of ``rows``): one adapter for the whole batch vs each row its own adapter,
    served as one batch-1 run per row (what per-run adapters allow; a gather graph could at best reach the first)."""
    from lily_deploy.runtime.ort import OrtAdapter, OrtRunner

    runner = OrtRunner(files["base"], threads)
    adapters = [OrtAdapter(files["packed"][k % len(files["packed"])]) for k in range(rows)]
    whole = runner.bind(inputs(rows, seq), adapter=adapters[0])
    per_row = [runner.bind(inputs(1, seq), adapter=a) for a in adapters]
    calls = {f"batch {rows}, one adapter": whole, f"batch {rows}, {rows} adapters (one run per row)":
             lambda: [f() for f in per_row]}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for f in calls.values():
        f()
    for _ in range(rounds):
        for name, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def switch_costs(files: dict, threads: int, rounds: int) -> dict:
    """Medians (ms): load an .onnx_adapter (verify + map) vs create a second full session of the baked graph."""
    from lily_deploy.runtime.ort import OrtAdapter, ort_session

    load, session = [], []
    ort_session(files["baked"], threads)  # warm the file cache and onnxruntime
    OrtAdapter(files["packed"][1])
    for k in range(rounds):
        t0 = time.perf_counter()
        OrtAdapter(files["packed"][k % len(files["packed"])])
        load.append((time.perf_counter() - t0) * 1e3)
        if k < max(3, rounds // 5):  # a session takes seconds: fewer samples
            t0 = time.perf_counter()
            ort_session(files["baked"], threads)
            session.append((time.perf_counter() - t0) * 1e3)
    return {"load adapter": statistics.median(load), "load second session": statistics.median(session)}


MEMORY_PROBE = r"""
import json, sys
from pathlib import Path
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import numpy as np
from lily_deploy.runtime.ort import OrtAdapter, OrtRunner
mode, base, n, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
feeds = {"input_ids": np.full((1, 128), 1000, np.int64), "attention_mask": np.ones((1, 128), np.int64),
         "token_type_ids": np.zeros((1, 128), np.int64)}
import onnx
from onnx import TensorProto, helper
from lily_deploy.runtime.ort import ort_session
tiny = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "warm",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
ort_session(tiny.SerializeToString()).run(None, {"x": np.ones(1, np.float32)})  # onnxruntime loaded, neither graph
start = rss()
held = []
if mode == "switchable":
    runner = OrtRunner(base)
    for f in files[:n]:
        held.append(OrtAdapter(f))
        runner.infer(feeds, adapter=held[-1])
else:
    for f in files[:n]:
        held.append(OrtRunner(f))
        held[-1].infer(feeds)
print(json.dumps({"mib": rss() - start}))
"""


def memory(files: dict, counts: list[int], work: Path) -> dict:
    """Resident MiB added by k adapters on one base vs k separate baked-in sessions, each in a fresh process."""
    copies = [files["baked"]]
    for k in range(1, max(counts)):
        copies.append(work / f"baked{k}.onnx")
        if not copies[-1].exists():
            shutil.copyfile(files["baked"], copies[-1])
    out = {}
    for n in counts:
        for mode, listed in (("switchable", files["packed"]), ("separate", copies)):
            proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, mode, str(files["base"]), str(n),
                                   *map(str, listed)], capture_output=True, text=True, check=True,
                                  env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
            out[(mode, n)] = json.loads(proc.stdout.strip().splitlines()[-1])["mib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--num-hp", type=int, default=4)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--mixed-rows", type=int, default=8, help="rows of the mixed-batch comparison")
    ap.add_argument("--adapters", default="1,4,16", help="adapter counts for the memory table")
    ap.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    args = ap.parse_args()
    counts = [int(c) for c in args.adapters.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="switchable-bench."))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = prepare(work, max(max(counts), 2), args.rank, args.num_hp, args.stride)
    print(f"prepared {len(files['packed'])} adapters in {time.perf_counter() - t0:.0f} s; "
          f"base {files['base'].stat().st_size / 2**20:.1f} MiB, adapter {files['packed'][0].stat().st_size / 1024:.1f} KiB")
    print(f"CPU: {cpu_name()}; onnxruntime threads {args.threads}; MiniLM r {args.rank}, E {args.num_hp}, "
          f"stride {args.stride}, query+value; batch {args.batch}, sequence {args.seq_len}")
    lat = latency(files, args.threads, args.rounds, args.per_round, args.batch, args.seq_len)
    sw = switch_costs(files, args.threads, args.rounds)
    mixed = mixed_batch(files, args.threads, args.rounds, args.mixed_rows, args.seq_len)
    mem = memory(files, counts, work)
    baked = lat["baked-in export"]
    print("\n| latency (median, ms/run) | ms | x baked-in |\n| --- | --- | --- |")
    for name, ms in lat.items():
        print(f"| {name} | {ms:.2f} | {ms / baked:.3f} |")
    print("\n| switching (median, ms) | ms |\n| --- | --- |")
    print(f"| load an .onnx_adapter (then the next run uses it) | {sw['load adapter']:.3f} |")
    print(f"| load a second full session (baked-in graph) | {sw['load second session']:.1f} |")
    print(f"| ratio | {sw['load second session'] / sw['load adapter']:.0f}x |")
    print("\n| mixed batch (median, ms/batch) | ms |\n| --- | --- |")
    for name, ms in mixed.items():
        print(f"| {name} | {ms:.1f} |")
    disk_base, disk_ad = files["base"].stat().st_size / 2**20, files["packed"][0].stat().st_size / 2**20
    print("\n| adapters | one base + adapters: RSS MiB (disk MiB) | separate graphs: RSS MiB (disk MiB) |\n| --- | --- | --- |")
    for n in counts:
        print(f"| {n} | {mem[('switchable', n)]:.0f} ({disk_base + n * disk_ad:.1f}) | "
              f"{mem[('separate', n)]:.0f} ({n * files['baked'].stat().st_size / 2**20:.1f}) |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
