"""``bench``: latency and throughput of models across backends, measured in ONE interleaved run.

Each model runs on every backend that applies to it: a model folder (adapter, deploy
checkpoint) or a base model name (``minilm``) in torch eager (and torch on CUDA where a GPU
is), an ONNX file on onnxruntime's CPU (and its CUDA provider where present), an engine on
TensorRT (GPU only; skipped with the reason elsewhere). For each batch size and sequence
length, every runner gets the same inputs; after warm-up the runners take turns call by call,
the starting runner rotating each round, so a noisy, shared machine slows all of them alike and
their ratios stay fair. Reported per runner: p50 / p90 / p99 / mean latency, throughput
(samples/s at the median), resident memory added by loading the model, and the peak extra
resident memory of the first call at each shape (high-water mark reset and read through
``/proc/self/clear_refs`` and ``VmHWM``; CUDA: ``torch.cuda.max_memory_allocated``). The memory
figures share one process, so they are approximate: an allocator may reuse what another runner
freed. With ``base``, each row also gets its latency ratio
to the base model's row of the same backend and shape: the adapter's overhead.

onnxruntime runs with spinning off (``session.intra_op.allow_spinning=0``) so its idle threads
do not steal the CPU from the next runner; torch uses ``threads`` threads (OpenMP waits as the
environment says; set ``OMP_WAIT_POLICY=PASSIVE`` before starting Python on a loaded machine).
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import LilyDeployError

BACKENDS = ("torch", "torch-cuda", "onnxruntime", "onnxruntime-cuda", "tensorrt")
DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_SEQ_LENS = (32, 128, 512)
SCHEMA = 1


# --------------------------------------------------------------------------- memory

def _status_kib(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mib() -> Optional[float]:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


def reset_peak() -> bool:
    """Reset the process's resident-memory high-water mark (Linux); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> Optional[float]:
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else None


# --------------------------------------------------------------------------- models and runners

@dataclass
class BenchModel:
    label: str
    spec: str
    kind: str  # torch, onnx, engine


def parse_model(spec: str) -> BenchModel:
    """``PATH`` or ``LABEL=PATH``; the kind comes from the path (file suffix, folder, or model name)."""
    from .parity import ENGINE_SUFFIXES

    label = None
    text = str(spec)
    if "=" in text and not Path(text).exists():
        label, text = text.split("=", 1)
        if not label or "/" in label:
            raise LilyDeployError(f"model {spec!r}: expected PATH or LABEL=PATH")
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        kind = "onnx"
    elif suffix in ENGINE_SUFFIXES:
        kind = "engine"
    else:
        kind = "torch"
    if kind != "torch" and not path.is_file():
        raise LilyDeployError(f"model {text}: file does not exist")
    if label is None:
        label = path.stem if kind != "torch" else (path.name or text)
    return BenchModel(label, text, kind)


@dataclass
class Runner:
    """One model on one backend: ``prepare(inputs)`` returns a zero-argument call that runs it once."""

    model: BenchModel
    backend: str
    input_names: list[str]
    prepare: Callable[[dict[str, np.ndarray]], Callable[[], None]]
    task: str = "seq-cls"
    vocab: Optional[int] = None
    image_size: Optional[int] = None
    fixed: dict = field(default_factory=dict)  # input -> {axis: size} for static ONNX axes
    load_mib: Optional[float] = None
    cuda: bool = False

    @property
    def name(self) -> str:
        return f"{self.model.label} ({self.backend})"

    def unsupported(self, batch: int, seq: Optional[int]) -> Optional[str]:
        for name, axes in self.fixed.items():
            if 0 in axes and axes[0] != batch:
                return f"{name} has a fixed batch of {axes[0]}"
            if seq and 1 in axes and name != "pixel_values" and axes[1] != seq:
                return f"{name} has a fixed sequence length of {axes[1]}"
        return None


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _torch_runner(m: BenchModel, backend: str, routing: Optional[str], base: Optional[str]) -> Runner:
    import torch

    from .export import open_model

    before = rss_mib()
    model = open_model(m.spec, base=base)
    model.eval()
    if routing and model.layers:
        model.set_routing(routing)
    cuda = backend == "torch-cuda"
    if cuda:
        model.cuda()
    names = list(model.input_names)

    def prepare(inputs):
        feeds = {n: torch.from_numpy(inputs[n]) for n in names}
        if cuda:
            feeds = {n: t.cuda() for n, t in feeds.items()}

        def call():
            with torch.inference_mode():
                model.logits(**feeds)
            if cuda:
                torch.cuda.synchronize()

        return call

    after = rss_mib()
    vocab = getattr(getattr(model.model, "config", None), "vocab_size", None)
    return Runner(m, backend, names, prepare, model.task, vocab, model.image_size,
                  load_mib=(after - before) if before is not None and after is not None else None, cuda=cuda)


def onnx_vocab(model) -> Optional[int]:
    """Rows of the embedding table that ``input_ids`` indexes (a Gather on an initializer)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids" \
                and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    return None


def _ort_runner(m: BenchModel, backend: str, threads: int) -> Runner:
    import onnx

    from .parity import ort_session

    graph = onnx.load(m.spec, load_external_data=False)
    meta = {p.key: p.value for p in graph.metadata_props}
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if backend == "onnxruntime-cuda" \
        else ["CPUExecutionProvider"]
    before = rss_mib()
    session = ort_session(Path(m.spec), threads, providers, flag="model")
    after = rss_mib()
    types = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16}
    ins = session.get_inputs()
    fixed = {}
    for i in ins:
        axes = {k: d for k, d in enumerate(i.shape or []) if isinstance(d, int) and d > 0 and k < 2}
        if axes:
            fixed[i.name] = axes
    names = [i.name for i in ins]
    out_names = [o.name for o in session.get_outputs()]

    def prepare(inputs):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise LilyDeployError(f"model {m.spec}: needs input {missing[0]!r}, which the other models do not take")
        feeds = {i.name: np.ascontiguousarray(inputs[i.name].astype(types.get(i.type, np.int64), copy=False))
                 for i in ins}

        def call():
            session.run(out_names, feeds)

        return call

    task = meta.get("lily_deploy.task", "image-cls" if "pixel_values" in names else "seq-cls").strip('"')
    size = None
    if "pixel_values" in names:
        shape = next(i.shape for i in ins if i.name == "pixel_values")
        size = shape[-1] if isinstance(shape[-1], int) else None
    return Runner(m, backend, names, prepare, task, onnx_vocab(graph), size, fixed,
                  load_mib=(after - before) if before is not None and after is not None else None,
                  cuda=backend == "onnxruntime-cuda")


def _engine_runner(m: BenchModel) -> Runner:
    """TensorRT through ``lily_deploy.trt_runner`` (GPU only): device buffers, one stream, synchronised."""
    from .trt_runner import load_runner

    engine = load_runner(m.spec)
    names = list(engine.input_names)
    fixed = {}
    for n in names:  # a dimension whose min == max in every profile is fixed
        for axis in (0, 1):
            sizes = {p[n][0][axis] for p in engine.profiles if len(p[n][0]) > axis} | \
                    {p[n][2][axis] for p in engine.profiles if len(p[n][2]) > axis}
            if len(sizes) == 1:
                fixed.setdefault(n, {})[axis] = sizes.pop()

    def prepare(inputs):
        feeds = {n: inputs[n] for n in names}

        def call():
            engine.infer(feeds, as_torch=True)

        return call

    task = "image-cls" if "pixel_values" in names else "seq-cls"
    return Runner(m, "tensorrt", names, prepare, task, fixed=fixed, cuda=True)


def backends_for(m: BenchModel) -> list[str]:
    return {"torch": ["torch", "torch-cuda"], "onnx": ["onnxruntime", "onnxruntime-cuda"],
            "engine": ["tensorrt"]}[m.kind]


def unavailable(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run here, or None."""
    if backend in ("torch-cuda", "tensorrt") and not _cuda():
        return "no CUDA GPU here"
    if backend == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider here (pip install 'lily-deploy[gpu]')"
        if not _cuda():
            return "no CUDA GPU here"
    if backend == "tensorrt":
        import importlib.util

        if importlib.util.find_spec("lily_deploy.trt_runner") is None:
            return "lily_deploy.trt_runner is not installed"
    return None


# --------------------------------------------------------------------------- results

@dataclass
class Measurement:
    model: str
    backend: str
    batch_size: int
    seq_len: Optional[int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput: float  # samples per second at the median latency
    iters: int
    load_mib: Optional[float]
    peak_run_mib: Optional[float]
    overhead_vs_base: Optional[float] = None
    base: Optional[str] = None


@dataclass
class BenchReport:
    settings: dict
    models: list[dict]
    results: list[Measurement]
    skipped: list[dict]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        from .report import environment

        return {"schema_version": SCHEMA, "kind": "bench", "settings": self.settings, "models": self.models,
                "results": [asdict(r) for r in self.results], "skipped": self.skipped, "notes": self.notes,
                "seconds": round(self.seconds, 3), "environment": environment()}

    def _rows(self):
        rows = []
        for r in self.results:
            rows.append([r.model, r.backend, str(r.batch_size), str(r.seq_len or "-"), f"{r.p50_ms:.2f}",
                         f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.throughput:.1f}",
                         f"{r.peak_run_mib:.0f}" if r.peak_run_mib is not None else "-",
                         f"{r.load_mib:.0f}" if r.load_mib is not None else "-",
                         f"{r.overhead_vs_base:.3f}" if r.overhead_vs_base is not None else "-"])
        return rows

    HEADERS = ["model", "backend", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "samples/s", "peak run MiB",
               "load MiB", "x base"]

    def table(self) -> str:
        from .report import text_table

        s = self.settings
        lines = [f"bench: {s['threads']} threads, {s['warmup']} warm-up + {s['iters']} interleaved iterations "
                 f"per runner and shape, {self.seconds:.0f} s", "", text_table(self.HEADERS, self._rows())]
        for sk in self.skipped:
            lines.append(f"skipped: {sk['model']} ({sk['backend']}): {sk['reason']}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)

    def markdown(self) -> str:
        from .report import markdown_table

        s = self.settings
        env = s.get("cpu") or ""
        out = [f"Latency per call, {s['threads']} threads{' on ' + env if env else ''}; {s['iters']} interleaved "
               f"iterations after {s['warmup']} warm-up; x base = p50 / p50 of the base model on the same backend "
               "and shape.", "",
               markdown_table(self.HEADERS, self._rows(), align="llrrrrrrrrr")]
        if self.skipped:
            out += [""] + [f"- skipped: {sk['model']} ({sk['backend']}): {sk['reason']}" for sk in self.skipped]
        return "\n".join(out) + "\n"


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# --------------------------------------------------------------------------- the run

def _inputs(runners: list[Runner], batch: int, seq: Optional[int], seed: int) -> dict[str, np.ndarray]:
    """The same inputs for every runner: random token ids (full attention) or random pixels."""
    rng = np.random.default_rng(seed + 1000 * batch + (seq or 0))
    if any(r.task == "image-cls" for r in runners):
        size = next((r.image_size for r in runners if r.image_size), 224)
        return {"pixel_values": rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)}
    vocabs = [r.vocab for r in runners if r.vocab]
    vocab = min(vocabs) if vocabs else 1000
    lo = min(1000, vocab // 2)
    ids = rng.integers(lo, vocab, (batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}


def run_bench(
    models: Sequence[str],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
    threads: Optional[int] = None,
    warmup: int = 3,
    iters: int = 20,
    backends: Optional[Sequence[str]] = None,
    base: Optional[Sequence[str]] = None,
    routing: str = "sample",
    base_model: Optional[str] = None,
    seed: int = 0,
    progress: bool = True,
) -> BenchReport:
    """Measure every model on every applicable backend, interleaved; see the module docstring.

    ``base`` names base models (paths or labels, also benchmarked) whose rows give the overhead
    ratio of every other row with the same backend and shape. ``routing`` applies to Lily models
    run in torch (ONNX files carry their own).
    """
    import torch
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if not models and not base:
        raise LilyDeployError("no MODEL given: name ONNX files, engines, model folders or minilm")
    for flag, values in (("--batch-sizes", batch_sizes), ("--seq-lens", seq_lens)):
        if not values or any(int(v) < 1 for v in values):
            raise LilyDeployError(f"{flag}: expected positive integers, got {list(values)}")
    if warmup < 0:
        raise LilyDeployError(f"--warmup {warmup}: must be >= 0")
    if iters < 1:
        raise LilyDeployError(f"--iters {iters}: must be >= 1")
    if threads is not None and threads < 1:
        raise LilyDeployError(f"--threads {threads}: must be >= 1")
    wanted = list(backends) if backends else None
    for b in wanted or []:
        if b not in BACKENDS:
            raise LilyDeployError(f"--backends {b!r}: choose from {', '.join(BACKENDS)}")
    specs = [parse_model(s) for s in models]
    base_specs = []
    for b in base or []:
        match = [m for m in specs if m.label == b or m.spec == b]
        if match:
            base_specs += match
        else:
            bm = parse_model(b)
            specs.insert(0, bm)
            base_specs.append(bm)
    labels = [m.label for m in specs]
    dup = sorted({l for l in labels if labels.count(l) > 1 and
                  len({m.kind for m in specs if m.label == l}) < labels.count(l)})
    if dup:
        raise LilyDeployError(f"model label {dup[0]!r} names two models of the same kind; label them with LABEL=PATH")
    base_labels = {m.label for m in base_specs}

    threads = int(threads or torch.get_num_threads())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    skipped: list[dict] = []
    runners: list[Runner] = []
    try:
        for m in tqdm(specs, desc="bench: load", unit="model", disable=None if progress else True, leave=False):
            for backend in backends_for(m):
                if wanted is not None and backend not in wanted:
                    continue
                why = unavailable(backend)
                if why is not None:
                    if wanted is not None or backend in ("torch", "onnxruntime", "tensorrt"):
                        skipped.append({"model": m.label, "backend": backend, "reason": why})
                    continue
                if m.kind == "torch":
                    runners.append(_torch_runner(m, backend, routing, base_model))
                elif m.kind == "onnx":
                    runners.append(_ort_runner(m, backend, threads))
                else:
                    runners.append(_engine_runner(m))
        if not runners:
            raise LilyDeployError("nothing to measure: every model/backend pair was skipped ("
                                  + "; ".join(f"{s['model']} ({s['backend']}): {s['reason']}" for s in skipped) + ")")
        tasks = {r.task for r in runners}
        if len(tasks) > 1:
            raise LilyDeployError(f"models of different tasks ({', '.join(sorted(tasks))}) cannot share inputs; "
                                  "bench them separately")
        image = "image-cls" in tasks
        seqs: list[Optional[int]] = [None] if image else [int(s) for s in seq_lens]
        configs = [(int(b), s) for b in batch_sizes for s in seqs]
        results: list[Measurement] = []
        total = len(configs) * (warmup + iters + 1) * len(runners)
        bar = tqdm(total=total, desc="bench", unit="call", disable=None if progress else True, leave=False)
        can_reset = reset_peak()
        for batch, seq in configs:
            inputs = _inputs(runners, batch, seq, seed)
            active = []
            for r in runners:
                why = r.unsupported(batch, seq)
                if why:
                    skipped.append({"model": r.model.label, "backend": r.backend, "batch_size": batch,
                                    "seq_len": seq, "reason": why})
                    bar.update(warmup + iters + 1)
                    continue
                active.append((r, r.prepare(inputs)))
            peaks = {}
            for r, call in active:  # the first call, high-water mark reset: what one call allocates
                peaks[r.name] = _measure_peak(call, r.cuda, can_reset)
                bar.update()
            for _ in range(warmup):
                for r, call in active:
                    call()
                    bar.update()
            times: dict[str, list[float]] = {r.name: [] for r, _ in active}
            gc.collect()
            gc.disable()
            try:
                for i in range(iters):
                    k = i % len(active)
                    for r, call in active[k:] + active[:k]:
                        t0 = time.perf_counter()
                        call()
                        times[r.name].append((time.perf_counter() - t0) * 1000.0)
                        bar.update()
            finally:
                gc.enable()
            for r, _ in active:
                t = times[r.name]
                p50 = _percentile(t, 50)
                results.append(Measurement(r.model.label, r.backend, batch, seq, p50, _percentile(t, 90),
                                           _percentile(t, 99), statistics.fmean(t), min(t),
                                           batch * 1000.0 / p50 if p50 > 0 else float("inf"), len(t),
                                           _round(r.load_mib), _round(peaks[r.name])))
        bar.close()
    finally:
        torch.set_num_threads(previous)
    for res in results:
        if res.model in base_labels:
            continue
        ref = next((b for b in results if b.model in base_labels and b.backend == res.backend
                    and b.batch_size == res.batch_size and b.seq_len == res.seq_len), None)
        if ref is not None and ref.p50_ms > 0:
            res.overhead_vs_base = round(res.p50_ms / ref.p50_ms, 4)
            res.base = ref.model
    notes = []
    if not can_reset:
        notes.append("peak memory: this system cannot reset the resident-set high-water mark; peak run MiB is not "
                     "measured")
    settings = {"threads": threads, "warmup": warmup, "iters": iters, "batch_sizes": [int(b) for b in batch_sizes],
                "seq_lens": [s for s in seqs], "routing": routing, "backends": wanted, "base": sorted(base_labels),
                "seed": seed, "cpu": _cpu(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    model_info = [{"label": m.label, "spec": m.spec, "kind": m.kind,
                   "backends": [r.backend for r in runners if r.model is m]} for m in specs]
    return BenchReport(settings, model_info, results, skipped, time.perf_counter() - started, notes)


def _cpu() -> Optional[str]:
    from .report import _cpu_name

    name = _cpu_name()
    return f"{name} ({os.cpu_count()} cores)" if name else None


def _round(v: Optional[float]) -> Optional[float]:
    return round(v, 1) if v is not None else None


def _measure_peak(call: Callable[[], None], cuda: bool, can_reset: bool) -> Optional[float]:
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        call()
        return (torch.cuda.max_memory_allocated() - start) / 2 ** 20
    if not can_reset:
        call()
        return None
    gc.collect()
    reset_peak()
    start = rss_mib()
    call()
    peak = peak_mib()
    return max(peak - start, 0.0) if peak is not None and start is not None else None
