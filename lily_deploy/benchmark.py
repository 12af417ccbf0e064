"""``bench``: latency and throughput of models across backends, measured in ONE interleaved run.

Each model runs on every backend that applies to it: a model folder (adapter, deploy
checkpoint) or a base model name (``minilm``) in torch eager (and torch on CUDA where a GPU
is), an ONNX file on onnxruntime's CPU (and its CUDA provider where present), an engine on
TensorRT (GPU only; skipped with the reason elsewhere). For each batch size and sequence
length every runner gets the same inputs; after warm-up the runners take turns call by call,
backend by backend, the starting runner rotating each round, so a noisy, shared machine slows all
of them alike and their ratios stay fair; a backend's first call after another backend's is
untimed (torch's OpenMP threads go on spinning after a call and would slow the next runner).
Reported per runner and shape: p50 / p90 / p99 / mean latency and throughput (samples/s at the
median). With ``base``, each row also gets its latency ratio to
the base model's row of the same backend and shape: the adapter's overhead.

Memory, per runner: the weights it holds (torch parameters and buffers, ONNX initializers,
engine size), and -- unless ``memory=False`` -- its peak memory measured in a fresh process that
loads only that model and runs the largest shape (``VmHWM``: interpreter, runtime, model and
activations; on CUDA also ``torch.cuda.max_memory_allocated``). Measuring it in the shared
process would credit one runner with what another allocated.

onnxruntime's threads spin only while a run lasts (``runtime.ort.SPIN_IN_RUN``), so its idle
threads do not steal the CPU from the next runner; torch uses ``threads`` threads (its OpenMP threads
wait as the environment says: ``OMP_WAIT_POLICY=PASSIVE`` on a loaded machine).

One :class:`BenchConfig` describes the run::

    run_bench(models=["base=minilm", "lily=out/adapter"], base=["base"], batch_sizes=(1, 8))
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .core.config import ConfigError, StageConfig, as_tuple, check_choice, check_number
from .core.errors import LilyDeployError
from .core.modes import DYNAMIC_MODES
from .runtime import Runner, cuda_available, kind_of
from .runtime.onnx_io import onnx_vocab
from .runtime.tensorrt import check_engine_header

BACKENDS = ("torch", "torch-cuda", "onnxruntime", "onnxruntime-cuda", "tensorrt")
DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_SEQ_LENS = (32, 128, 512)
SCHEMA = 1
# the first four bytes of a serialized plan, per TensorRT flavour (read without importing TensorRT)


def _status_mib(key: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------- models and runners

@dataclass
class BenchModel:
    label: str
    spec: str
    kind: str  # torch, onnx, engine


def parse_model(spec: str) -> BenchModel:
    """``PATH`` or ``LABEL=PATH``; the kind comes from the path (file suffix, folder, or model name)."""
    label = None
    text = str(spec)
    if "=" in text and not Path(text).exists():
        label, text = text.split("=", 1)
        if not label or "/" in label:
            raise LilyDeployError(f"model {spec!r}: expected PATH or LABEL=PATH")
    from .runtime import split_adapter_spec

    base_text, adapter = split_adapter_spec(text)  # a switchable graph or engine with its adapter
    path = Path(base_text)
    kind = kind_of(path)
    for p in (path, Path(adapter)) if adapter else (path,):
        if kind != "torch" and not p.is_file():
            raise LilyDeployError(f"model {p}: file does not exist")
    if kind == "engine":
        check_engine_header(path, f"model {text}")
    if label is None:
        label = path.stem if kind != "torch" else (path.name or text)
        label = f"{label}+{Path(adapter).stem}" if adapter else label
    return BenchModel(label, text, kind)


@dataclass
class BenchTarget:
    """One model on one backend: its runtime :class:`~lily_deploy.runtime.Runner` plus what bench needs
    to make inputs for it (task, vocabulary, image size, fixed axes) and its weight size."""

    model: BenchModel
    backend: str  # one of BACKENDS
    runner: Runner
    task: str = "seq-cls"
    vocab: Optional[int] = None
    image_size: Optional[int] = None
    fixed: dict = field(default_factory=dict)  # input -> {axis: size} for fixed axes
    weights_mib: Optional[float] = None

    @property
    def input_names(self) -> list[str]:
        return list(self.runner.input_names)

    @property
    def cuda(self) -> bool:
        return self.backend in ("torch-cuda", "onnxruntime-cuda", "tensorrt")

    @property
    def name(self) -> str:
        return f"{self.model.label} ({self.backend})"

    def prepare(self, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
        """A zero-argument call that runs the model once on ``inputs``."""
        return self.runner.bind(inputs)

    def unsupported(self, batch: int, seq: Optional[int]) -> Optional[str]:
        for name, axes in self.fixed.items():
            if 0 in axes and axes[0] != batch:
                return f"{name} has a fixed batch of {axes[0]}"
            if seq and 1 in axes and name != "pixel_values" and axes[1] != seq:
                return f"{name} has a fixed sequence length of {axes[1]}"
        return None


def _torch_target(m: BenchModel, backend: str, routing: Optional[str], base: Optional[str]) -> BenchTarget:
    from .core.deploy import open_model
    from .runtime.torch_runner import TorchRunner

    model = open_model(m.spec, base=base)
    model.eval()
    if routing and model.layers:
        model.set_routing(routing)
    runner = TorchRunner(model, m.label, "cuda" if backend == "torch-cuda" else "cpu")
    tensors = {id(t): t for t in list(model.model.parameters()) + list(model.model.buffers())}
    weights = sum(t.numel() * t.element_size() for t in tensors.values()) / 2 ** 20
    vocab = getattr(getattr(model.model, "config", None), "vocab_size", None)
    return BenchTarget(m, backend, runner, model.task, vocab, model.image_size, weights_mib=weights)


def onnx_weights_mib(model) -> float:
    """Size of the graph's initializers (what the runner holds as weights)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    total = 0
    for t in model.graph.initializer:
        try:
            itemsize = tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 4
        total += int(np.prod([int(d) for d in t.dims], dtype=np.int64)) * itemsize
    return total / 2 ** 20


def _ort_target(m: BenchModel, backend: str, threads: Optional[int]) -> BenchTarget:
    from .runtime.onnx_io import load_onnx, metadata
    from .runtime.ort import CPU, CUDA, OrtRunner

    from .runtime import split_adapter_spec

    graph = load_onnx(split_adapter_spec(m.spec)[0], flag="model")
    meta = metadata(graph)
    runner = OrtRunner(m.spec, threads, CUDA if backend == "onnxruntime-cuda" else CPU, flag="model")
    fixed = {}
    for name, shape in runner.input_shapes.items():
        axes = {k: d for k, d in enumerate(shape) if isinstance(d, int) and d > 0 and k < 2}
        if axes:
            fixed[name] = axes
    names = runner.input_names
    task = meta.get("lily_deploy.task", "image-cls" if "pixel_values" in names else "seq-cls").strip('"')
    size = None
    if "pixel_values" in names:
        shape = runner.input_shapes["pixel_values"]
        size = shape[-1] if isinstance(shape[-1], int) else None
    return BenchTarget(m, backend, runner, task, onnx_vocab(graph), size, fixed, weights_mib=onnx_weights_mib(graph))


def _engine_target(m: BenchModel) -> BenchTarget:
    """TensorRT through the runtime layer (GPU only): device buffers, one stream, synchronised."""
    from .runtime import split_adapter_spec
    from .runtime.tensorrt import TrtRunner

    engine = TrtRunner(m.spec)
    fixed = {}
    for n in engine.input_names:  # a dimension whose min == max in every profile is fixed
        for axis in (0, 1):
            sizes = {p[n][0][axis] for p in engine.profiles if len(p[n][0]) > axis} | \
                    {p[n][2][axis] for p in engine.profiles if len(p[n][2]) > axis}
            if len(sizes) == 1:
                fixed.setdefault(n, {})[axis] = sizes.pop()
    task = "image-cls" if "pixel_values" in engine.input_names else "seq-cls"
    return BenchTarget(m, "tensorrt", engine, task, fixed=fixed, weights_mib=Path(split_adapter_spec(m.spec)[0]).stat().st_size / 2 ** 20)


def make_runner(m: BenchModel, backend: str, threads: Optional[int], routing: Optional[str],
                base_model: Optional[str]) -> BenchTarget:
    if m.kind == "torch":
        return _torch_target(m, backend, routing, base_model)
    if m.kind == "onnx":
        return _ort_target(m, backend, threads)
    return _engine_target(m)


def backends_for(m: BenchModel) -> list[str]:
    return {"torch": ["torch", "torch-cuda"], "onnx": ["onnxruntime", "onnxruntime-cuda"],
            "engine": ["tensorrt"]}[m.kind]


def unavailable(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run here, or None."""
    if backend in ("torch-cuda", "tensorrt") and not cuda_available():
        return "no CUDA GPU here"
    if backend == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider here (pip install 'lily-deploy[gpu]')"
        if not cuda_available():
            return "no CUDA GPU here"
    if backend == "tensorrt":
        import importlib.util

        if not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
            return "no TensorRT is installed here"
    return None


# --------------------------------------------------------------------------- peak memory, in a fresh process

def peak_memory(m: BenchModel, backend: str, threads: Optional[int], routing: Optional[str],
                base_model: Optional[str], shape: dict, timeout: float = 600.0) -> tuple[Optional[dict], str]:
    """Peak memory of a process that loads only ``m`` and runs it twice at ``shape``; (result, why not)."""
    job = {"label": m.label, "spec": m.spec, "kind": m.kind, "backend": backend, "threads": threads,
           "routing": routing, "base_model": base_model, "shape": shape}
    try:
        proc = subprocess.run([sys.executable, "-m", "lily_deploy.benchmark", "--peak-worker", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return None, f"the memory probe took over {timeout:.0f} s"
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"the memory probe failed: {tail[:200]}"
    return json.loads(lines[-1]), ""


def _peak_worker(job: dict) -> dict:
    start = _status_mib("VmHWM")
    m = BenchModel(job["label"], job["spec"], job["kind"])
    if job["kind"] == "torch" and job["threads"]:
        import torch

        torch.set_num_threads(int(job["threads"]))
    runner = make_runner(m, job["backend"], job["threads"], job["routing"], job["base_model"])
    shape = job["shape"]
    inputs = _inputs([runner], shape["batch_size"], shape["seq_len"], 0)
    call = runner.prepare(inputs)
    if runner.cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    call()
    call()
    out = {"peak_rss_mib": _status_mib("VmHWM"), "interpreter_mib": start}
    if runner.cuda:
        import torch

        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


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
    weights_mib: Optional[float]
    peak_rss_mib: Optional[float]  # fresh process, largest shape (the same for every shape of a runner)
    peak_gpu_mib: Optional[float] = None
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

    HEADERS = ["model", "backend", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "samples/s", "weights MiB",
               "peak RSS MiB", "x base"]

    def to_json(self) -> dict:
        from .report import environment

        return {"schema_version": SCHEMA, "kind": "bench", "settings": self.settings, "models": self.models,
                "results": [asdict(r) for r in self.results], "skipped": self.skipped, "notes": self.notes,
                "seconds": round(self.seconds, 3), "environment": environment()}

    def _rows(self):
        f = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        return [[r.model, r.backend, str(r.batch_size), str(r.seq_len or "-"), f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}",
                 f"{r.p99_ms:.2f}", f"{r.throughput:.1f}", f(r.weights_mib, ".0f"),
                 f(r.peak_rss_mib, ".0f") + (f" (GPU {r.peak_gpu_mib:.0f})" if r.peak_gpu_mib is not None else ""),
                 f(r.overhead_vs_base, ".3f")] for r in self.results]

    def _legend(self) -> str:
        s = self.settings
        threads = f"{s['threads']} thread{'s' if s['threads'] != 1 else ''}"
        return (f"{threads}{' on ' + s['cpu'] if s.get('cpu') else ''}; {s['warmup']} warm-up + "
                f"{s['iters']} interleaved iterations per runner and shape; x base = p50 / p50 of the base on the "
                "same backend and shape; peak RSS: a fresh process with only that model, at the largest shape")

    def table(self) -> str:
        from .report import text_table

        lines = [f"bench: {self._legend()} ({self.seconds:.0f} s)", "", text_table(self.HEADERS, self._rows())]
        for sk in self.skipped:
            where = f" at batch {sk['batch_size']}, seq {sk['seq_len']}" if "batch_size" in sk else ""
            lines.append(f"skipped: {sk['model']} ({sk['backend']}){where}: {sk['reason']}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        from .report import markdown_table

        out = [f"Latency per call: {self._legend()}.", "",
               markdown_table(self.HEADERS, self._rows(), align="llrrrrrrrrr")]
        if self.skipped:
            out += [""] + [f"- skipped: {sk['model']} ({sk['backend']}): {sk['reason']}" for sk in self.skipped]
        return "\n".join(out) + "\n"


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# --------------------------------------------------------------------------- the run

def _inputs(runners: list[BenchTarget], batch: int, seq: Optional[int], seed: int) -> dict[str, np.ndarray]:
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


def _resolve_models(models: Sequence[str], base: Sequence[str]) -> tuple[list[BenchModel], set[str]]:
    specs = [parse_model(s) for s in models]
    base_labels = set()
    for b in base:
        match = [m for m in specs if m.label == b or m.spec == b]
        if not match:
            match = [parse_model(b)]
            specs.insert(0, match[0])
        base_labels |= {m.label for m in match}
    labels = [m.label for m in specs]
    for label in labels:
        kinds = [m.kind for m in specs if m.label == label]
        if len(kinds) != len(set(kinds)):
            raise LilyDeployError(f"model label {label!r} names two models of the same kind; "
                                  "label them with LABEL=PATH")
    return specs, base_labels


@dataclass(frozen=True)
class BenchConfig(StageConfig):
    """What :func:`run_bench` measures, on which backends and shapes, for how many calls.

    ``models`` are ``PATH`` or ``LABEL=PATH`` specs; ``base`` names base models (paths or labels,
    also benchmarked) whose rows give the overhead ratio of every other row with the same backend
    and shape. ``threads`` None: torch's own count. ``backends`` None: every one that applies and
    is available. ``routing`` applies to Lily models run in torch (ONNX files carry their own).
    ``memory`` adds the fresh-process peak memory.
    """

    models: Sequence[str] = ()
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
    seq_lens: Sequence[int] = DEFAULT_SEQ_LENS
    threads: Optional[int] = None
    warmup: int = 3
    iters: int = 20
    backends: Optional[Sequence[str]] = None
    base: Sequence[str] = ()
    routing: str = "sample"
    base_model: Optional[str] = None
    memory: bool = True
    seed: int = 0
    progress: bool = True
    new_tokens: int = 32  # decoders: greedy decode steps timed per iteration (seq_lens are prompt lengths)

    def __post_init__(self) -> None:
        for name in ("models", "batch_sizes", "seq_lens", "base"):
            object.__setattr__(self, name, as_tuple(getattr(self, name)))
        if self.backends is not None:
            object.__setattr__(self, "backends", as_tuple(self.backends))
        super().__post_init__()

    def validate(self) -> None:
        if not self.models and not self.base:
            raise ConfigError("models", "no model given: name ONNX files, engines, model folders or minilm")
        for name in ("batch_sizes", "seq_lens"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(name, "give at least one value")
            for v in values:
                check_number(name, v, 1, integer=True)
        check_number("threads", self.threads, 1, integer=True, allow_none=True)
        check_number("warmup", self.warmup, 0, integer=True)
        check_number("iters", self.iters, 1, integer=True)
        check_number("new_tokens", self.new_tokens, 1, integer=True)
        check_number("seed", self.seed, integer=True)
        if self.backends is not None:
            if not self.backends:
                raise ConfigError("backends", f"give at least one of {', '.join(BACKENDS)}")
            for b in self.backends:
                check_choice("backends", b, BACKENDS)
        check_choice("routing", self.routing, DYNAMIC_MODES)


def run_bench(config: Optional[BenchConfig] = None, /, **fields) -> BenchReport:
    """Measure every model on every applicable backend, interleaved; see the module docstring.

    Takes a :class:`BenchConfig`, or its fields as keywords. Bad input raises :class:`LilyDeployError`.
    """
    import torch
    from tqdm.auto import tqdm

    config = BenchConfig.resolve(config, **fields)
    started = time.perf_counter()
    specs, base_labels = _resolve_models(config.models, config.base)
    threads = int(config.threads or torch.get_num_threads())
    decoders = _decoder_models(specs)
    if decoders:
        from .decoder_bench import run_decoder_bench

        return run_decoder_bench(config, specs, base_labels, threads, _cpu())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    skipped: list[dict] = []
    results: list[Measurement] = []
    try:
        runners = _load_targets(config, specs, threads, skipped)
        seqs = _sequence_lengths(config, runners)
        shapes = [(int(b), s) for b in config.batch_sizes for s in seqs]
        bar = tqdm(total=len(shapes) * (config.warmup + config.iters) * len(runners), desc="bench", unit="call",
                   disable=None if config.progress else True, leave=False)
        for batch, seq in shapes:
            results += _measure_shape(config, runners, batch, seq, skipped, bar)
        bar.close()
    finally:
        torch.set_num_threads(previous)
    notes = _add_peak_memory(config, runners, results, threads) if config.memory else []
    _add_base_ratios(results, base_labels)
    settings = {"threads": threads, "warmup": config.warmup, "iters": config.iters,
                "batch_sizes": [int(b) for b in config.batch_sizes], "seq_lens": seqs, "routing": config.routing,
                "backends": list(config.backends) if config.backends else None, "base": sorted(base_labels),
                "memory": config.memory, "seed": config.seed, "cpu": _cpu(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    model_info = [{"label": m.label, "spec": m.spec, "kind": m.kind,
                   "backends": [r.backend for r in runners if r.model is m]} for m in specs]
    return BenchReport(settings, model_info, results, skipped, time.perf_counter() - started, notes)


def _decoder_models(specs: list[BenchModel]) -> bool:
    """True when the models are causal LMs (timed by generation); a mix with encoders is refused."""
    from .decoder_bench import is_decoder_model

    flags = {m.label: is_decoder_model(m) for m in specs}
    if any(flags.values()) and not all(flags.values()):
        enc = next(label for label, dec in flags.items() if not dec)
        dec = next(label for label, d in flags.items() if d)
        raise LilyDeployError(f"model {enc}: is not a causal LM, but {dec} is; bench decoders (prefill and decode "
                              "with a KV cache) and encoders in separate runs")
    return bool(flags) and all(flags.values())


def _load_targets(config: BenchConfig, specs: list[BenchModel], threads: int, skipped: list[dict]) -> list[BenchTarget]:
    """Every model on every backend that applies and is here; why not is appended to ``skipped``."""
    from tqdm.auto import tqdm

    wanted = list(config.backends) if config.backends else None
    runners = []
    for m in tqdm(specs, desc="bench: load", unit="model", disable=None if config.progress else True, leave=False):
        for backend in backends_for(m):
            if wanted is not None and backend not in wanted:
                continue
            why = unavailable(backend)
            if why is not None:
                if wanted is not None or backend in ("torch", "onnxruntime", "tensorrt"):
                    skipped.append({"model": m.label, "backend": backend, "reason": why})
                continue
            runners.append(make_runner(m, backend, threads, config.routing, config.base_model))
    if not runners:
        raise LilyDeployError("nothing to measure: every model/backend pair was skipped ("
                              + "; ".join(f"{s['model']} ({s['backend']}): {s['reason']}" for s in skipped) + ")")
    return runners


def _sequence_lengths(config: BenchConfig, runners: list[BenchTarget]) -> list[Optional[int]]:
    """The sequence lengths to measure (None alone for image models); every runner must share one task."""
    tasks = {r.task for r in runners}
    if len(tasks) > 1:
        raise LilyDeployError(f"models of different tasks ({', '.join(sorted(tasks))}) cannot share inputs; "
                              "bench them separately")
    return [None] if "image-cls" in tasks else [int(s) for s in config.seq_lens]


def _measure_shape(config: BenchConfig, runners: list[BenchTarget], batch: int, seq: Optional[int],
                   skipped: list[dict], bar) -> list[Measurement]:
    """Every runner that takes this shape, on the same inputs, timed call by call in turns."""
    inputs = _inputs(runners, batch, seq, config.seed)
    active = []
    for r in runners:
        why = r.unsupported(batch, seq)
        if why:
            skipped.append({"model": r.model.label, "backend": r.backend, "batch_size": batch, "seq_len": seq,
                            "reason": why})
            bar.update(config.warmup + config.iters)
            continue
        active.append((r, r.prepare(inputs)))
    times = _time_interleaved(active, config.warmup, config.iters, bar)
    out = []
    for r, _ in active:
        t = times[r.name]
        p50 = _percentile(t, 50)
        out.append(Measurement(r.model.label, r.backend, batch, seq, p50, _percentile(t, 90), _percentile(t, 99),
                               statistics.fmean(t), min(t), batch * 1000.0 / p50 if p50 > 0 else float("inf"),
                               len(t), _round(r.weights_mib), None))
    return out


def _time_interleaved(active: list[tuple[BenchTarget, Callable[[], None]]], warmup: int, iters: int,
                      bar) -> dict[str, list[float]]:
    """Milliseconds per call of each runner, in turns, GC held off, so a noisy machine slows every runner alike.

    Runners take turns backend by backend, the starting runner (and backend) rotating each round.
    When the run switches backend, that backend's next runner first makes one untimed call, so no
    timed call follows another backend's: torch's OpenMP threads spin for a while after a call and
    slowed whichever onnxruntime runner came next (fused MiniLM, Lily / base on onnxruntime read
    0.98 with torch runners in the turn, 1.11 with this, as in an onnxruntime-only run).
    """
    for _ in range(warmup):
        for r, call in active:
            call()
            bar.update()
    groups: dict[str, list[tuple[BenchTarget, Callable[[], None]]]] = {}
    for r, call in active:
        groups.setdefault(r.backend, []).append((r, call))
    order = list(groups.values())
    times: dict[str, list[float]] = {r.name: [] for r, _ in active}
    gc.collect()
    gc.disable()
    try:
        for i in range(iters):
            g = i % len(order) if order else 0
            for group in order[g:] + order[:g]:
                k = i % len(group)
                turn = group[k:] + group[:k]
                if len(order) > 1:
                    turn[0][1]()  # settles the previous backend's threads; untimed
                for r, call in turn:
                    t0 = time.perf_counter()
                    call()
                    times[r.name].append((time.perf_counter() - t0) * 1000.0)
                    bar.update()
    finally:
        gc.enable()
    return times


def _add_peak_memory(config: BenchConfig, runners: list[BenchTarget], results: list[Measurement],
                     threads: int) -> list[str]:
    """Each runner's peak memory, probed in a fresh process at its largest shape; notes for the failures."""
    from tqdm.auto import tqdm

    notes = []
    for r in tqdm(runners, desc="bench: peak memory", unit="model", disable=None if config.progress else True,
                  leave=False):
        mine = [x for x in results if x.model == r.model.label and x.backend == r.backend]
        if not mine:
            continue
        biggest = max(mine, key=lambda x: (x.batch_size * (x.seq_len or 1), x.batch_size))
        got, why = peak_memory(r.model, r.backend, threads, config.routing, config.base_model,
                               {"batch_size": biggest.batch_size, "seq_len": biggest.seq_len})
        if got is None:
            notes.append(f"peak memory of {r.name}: {why}")
            continue
        for x in mine:
            x.peak_rss_mib = _round(got.get("peak_rss_mib"))
            x.peak_gpu_mib = _round(got.get("peak_gpu_mib"))
    return notes


def _add_base_ratios(results: list[Measurement], base_labels: set[str]) -> None:
    """Each non-base row's p50 over the base's on the same backend and shape (none across backends)."""
    for res in results:
        if res.model in base_labels:
            continue
        ref = next((b for b in results if b.model in base_labels and b.backend == res.backend
                    and b.batch_size == res.batch_size and b.seq_len == res.seq_len), None)
        if ref is not None and ref.p50_ms > 0:
            res.overhead_vs_base = round(res.p50_ms / ref.p50_ms, 4)
            res.base = ref.model


def _cpu() -> Optional[str]:
    from .report import cpu_name

    name = cpu_name()
    return f"{name} ({os.cpu_count()} cores)" if name else None


def _round(v: Optional[float]) -> Optional[float]:
    return round(v, 1) if v is not None else None


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--peak-worker":
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(_peak_worker(json.loads(sys.argv[2]))), flush=True)
