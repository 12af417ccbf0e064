"""``bench`` for decoders: prefill latency and decode tokens/s, every model in ONE interleaved run.

A decoder is timed the way it generates: one prefill of a left-padded batch of random prompts
(``seq_lens`` are the prompt lengths), then ``new_tokens`` greedy steps with the KV cache and
routing state, each step timed. The models take turns call by call -- every model's prefill,
then every model's first step, ... -- and the model that goes first rotates each iteration (the
order reversing every other cycle), so a noisy machine slows them alike. Reported per model and
shape: the median prefill ms and decode ms/token over ``iters`` iterations, decode tokens/s
(batch / step time), and with ``base`` the ratios to the base model (decode also as the spread
of the per-iteration paired ratios). Exported graphs run on onnxruntime, adapter folders and
deploy checkpoints in torch (with the routing they were trained with), engines on TensorRT
where a GPU is.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .core.errors import LilyDeployError

KIND = "decoder-bench"


def is_decoder_model(m) -> bool:
    """Whether a :class:`~lily_deploy.benchmark.BenchModel` is a causal LM (graph with a KV cache, adapter, ...)."""
    if m.kind == "onnx":
        from .runtime import split_adapter_spec
        from .runtime.onnx_io import load_onnx

        graph, _ = split_adapter_spec(m.spec)  # a switchable graph with its adapter: the graph decides
        names = [i.name for i in load_onnx(Path(graph), flag="model").graph.input]
        return any(n.startswith("past_key_values.") for n in names)
    if m.kind == "torch":
        return _folder_task(Path(m.spec)) == "causal-lm"
    return False


def _folder_task(path: Path) -> Optional[str]:
    """The task of an adapter folder, a deploy checkpoint or a base model, reading only their JSON files."""
    import json

    from .core.adapters import ADAPTER_CONFIG, read_adapter
    from .core.deploy import DEPLOY_CONFIG
    from .training import detect_task

    if (path / ADAPTER_CONFIG).is_file():
        return read_adapter(path).task
    if (path / DEPLOY_CONFIG).is_file():
        try:
            return json.loads((path / DEPLOY_CONFIG).read_text()).get("task")
        except (OSError, ValueError):
            return None
    return detect_task(str(path))


def open_bench_decoder(m, threads: int):
    """The decoder that runs ``m``: onnxruntime for a graph, torch for a folder, TensorRT for an engine."""
    if m.kind == "onnx":
        from .runtime.decoder_ort import OrtDecoder

        return OrtDecoder(m.spec, threads=threads, flag=f"model {m.label}")
    if m.kind == "engine":
        from .runtime.decoder_trt import TrtDecoder

        return TrtDecoder(m.spec)
    from .core.deploy import open_model
    from .runtime.decoder import TorchDecoder

    return TorchDecoder(open_model(m.spec), m.label)


class _Run:
    """One model's generation in progress: the cache, mask, positions and the token to feed next."""

    def __init__(self, decoder, ids, mask, pos):
        self.decoder, self.ids, self.mask, self.pos = decoder, ids, mask, pos
        self.cache = self.feed = None

    def prefill(self) -> float:
        start = self.decoder.start(self.ids.shape[0])
        t = time.perf_counter()
        logits, self.cache = self.decoder.step(self.ids, self.mask, self.pos, start)
        elapsed = time.perf_counter() - t
        self._advance(logits)
        return elapsed

    def step(self) -> float:
        t = time.perf_counter()
        logits, self.cache = self.decoder.step(self.feed, self.mask, self.pos, self.cache)
        elapsed = time.perf_counter() - t
        self._advance(logits)
        return elapsed

    def _advance(self, logits) -> None:
        """Greedy next token and the grown mask/positions: untimed, as a server overlaps it."""
        self.feed = np.asarray(logits)[:, -1].argmax(-1).astype(np.int64)[:, None]
        self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], 1), np.int64)], axis=1)
        self.pos = self.pos[:, -1:] + 1


def iteration(decoders: dict, prompt, new_tokens: int, first: int) -> dict:
    """One prefill + ``new_tokens`` steps per model, taking turns call by call from model ``first``.

    Returns ``{name: (prefill seconds, mean step seconds)}``.
    """
    names = list(decoders)
    order = names[first % len(names):] + names[:first % len(names)]
    if (first // len(names)) % 2:
        order.reverse()
    runs = {n: _Run(decoders[n], *prompt) for n in names}
    prefill = {n: runs[n].prefill() for n in order}
    steps = {n: 0.0 for n in names}
    for _ in range(new_tokens):
        for n in order:
            steps[n] += runs[n].step()
    return {n: (prefill[n], steps[n] / new_tokens) for n in names}


def random_prompt(decoders: dict, batch: int, length: int, seed: int):
    """A left-padded batch of random token ids every model's vocabulary holds."""
    from .generation import left_pad

    vocab = min(int(getattr(d, "vocab_size", 0) or 1000) for d in decoders.values())
    rng = np.random.default_rng(seed + batch * 1000 + length)
    return left_pad(rng.integers(min(5, vocab - 1), vocab, (batch, length)).tolist(), 0)


def quantile(values: list, q: float) -> float:
    """The ``q`` quantile of sorted ``values`` (nearest rank from below)."""
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(decoders: dict, prompt, new_tokens: int, warmup: int, iters: int, base: Optional[str] = None) -> dict:
    """Medians of prefill and decode-step time for one prompt batch; ratios (and paired spreads) to ``base``."""
    batch = prompt[0].shape[0]
    for i in range(warmup):
        iteration(decoders, prompt, new_tokens, i)
    samples = [iteration(decoders, prompt, new_tokens, i) for i in range(iters)]
    out = {}
    for n in decoders:
        step = statistics.median(s[n][1] for s in samples)
        out[n] = {"prefill_ms": 1000 * statistics.median(s[n][0] for s in samples),
                  "decode_ms_per_token": 1000 * step, "tokens_per_s": batch / step}
    if base is not None:
        for n in decoders:
            paired = sorted(s[base][1] / s[n][1] for s in samples)  # this iteration's tok/s ratio to the base
            out[n].update(prefill_ratio=out[n]["prefill_ms"] / out[base]["prefill_ms"],
                          tokens_per_s_ratio=out[n]["tokens_per_s"] / out[base]["tokens_per_s"],
                          ratio_p25=quantile(paired, 0.25), ratio_p75=quantile(paired, 0.75))
    return out


@dataclass
class DecoderBenchReport:
    settings: dict
    models: list
    rows: list = field(default_factory=list)  # one per model, batch and prompt length
    skipped: list = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"kind": KIND, "settings": self.settings, "models": self.models, "results": self.rows,
                "skipped": self.skipped, "seconds": round(self.seconds, 2)}

    def markdown(self) -> str:
        lines = ["| model | backend | batch | prompt | prefill ms | × base | decode ms/token | decode tok/s | "
                 "× base (p25-p75) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            ratio = (f"{r['tokens_per_s_ratio']:.3f} ({r['ratio_p25']:.3f}-{r['ratio_p75']:.3f})"
                     if "tokens_per_s_ratio" in r else "-")
            prefill = f"{r['prefill_ratio']:.3f}" if "prefill_ratio" in r else "-"
            lines.append(f"| {r['label']} | {r['backend']} | {r['batch']} | {r['prompt_len']} | {r['prefill_ms']:.2f} | "
                         f"{prefill} | {r['decode_ms_per_token']:.3f} | {r['tokens_per_s']:.1f} | {ratio} |")
        lines += [f"skipped {s['label']}: {s['reason']}" for s in self.skipped]
        s = self.settings
        lines.append(f"{s['new_tokens']} decode steps per iteration, {s['warmup']} warm-up + {s['iters']} timed "
                     f"iterations, {s['threads']} threads, CPU {s['cpu']}; medians")
        return "\n".join(lines)

    table = markdown


def run_decoder_bench(config, specs: list, base_labels: set, threads: int, cpu: Optional[str]) -> DecoderBenchReport:
    """Every decoder model of a :class:`~lily_deploy.benchmark.BenchConfig`, interleaved (see the module doc)."""
    started = time.perf_counter()
    decoders, backends, skipped = {}, {}, []
    for m in specs:
        if m.kind == "engine":
            from .runtime import cuda_available

            if not cuda_available():
                skipped.append({"label": m.label, "reason": "no CUDA GPU here: a TensorRT engine runs only on a GPU"})
                continue
        key = m.label if m.label not in decoders else f"{m.label} ({m.kind})"
        decoders[key] = open_bench_decoder(m, threads)
        backends[key] = decoders[key].backend
    if not decoders:
        raise LilyDeployError("no decoder could run here: " + "; ".join(s["reason"] for s in skipped))
    base = next((label for label in decoders if label in base_labels), None)
    rows = []
    for batch in config.batch_sizes:
        for length in config.seq_lens:
            prompt = random_prompt(decoders, int(batch), int(length), config.seed)
            measured = measure(decoders, prompt, config.new_tokens, config.warmup, config.iters, base)
            rows += [{"label": n, "backend": backends[n], "batch": int(batch), "prompt_len": int(length), **r}
                     for n, r in measured.items()]
    settings = {"threads": threads, "warmup": config.warmup, "iters": config.iters, "new_tokens": config.new_tokens,
                "batch_sizes": [int(b) for b in config.batch_sizes], "prompt_lens": [int(s) for s in config.seq_lens],
                "base": base, "cpu": cpu, "seed": config.seed}
    models = [{"label": m.label, "spec": m.spec, "kind": m.kind} for m in specs]
    return DecoderBenchReport(settings, models, rows, skipped, time.perf_counter() - started)
