"""``parity`` for causal LMs: does the deployed decoder generate what the trained model generates?

:func:`lily_deploy.parity_check.run_parity` comes here when the reference is a causal LM. The
torch reference and every candidate (an exported decoder graph on onnxruntime, or a model folder
in torch) generate greedily from the same prompts -- a JSONL file's ``prompt`` fields, or the
built-in :data:`~lily_deploy.decoder_export.VALIDATION_PROMPTS` -- one prompt at a time and as
left-padded batches (every batch size of the config). Per candidate the report gives:

* the greedy exact-match rate (a prompt matches when all its new tokens equal the reference's),
  the first step where tokens diverge (step 1 is the first new token) and the per-step logits
  max |d| (max over the steps and their median; a step counts while the prompt's earlier tokens
  still agree, since after a divergence the two models continue different texts);
* batch invariance: the candidate's tokens for each prompt alone equal its tokens in a batch;
* cache consistency: the cached per-step logits equal one pass over all the generated tokens
  -- for a torch model, one uncached forward over prompt + tokens (with the prompt mask for
  ``prompt`` routing); for an exported graph, the prefill and then every generated token in
  one cached step (past > 0, several new tokens) -- for the candidate and for the reference.

fp32 needs every token equal and logits within ``atol`` (1e-4); a reduced precision holds its
exact-match rate to its agreement floor. The reference runs in each candidate's recorded
routing. A reference whose own routing is not exact under a KV cache (``batch``, PEFT's, or
``sample``: an adapter trained with it, or one recording no routing) is measured as a FINDING,
not a failure: how many of its tokens differ between cached and uncached generation, and
between a prompt alone and in a batch. A candidate with such routing is judged at batch 1 only
(its padded batches and its cache are findings too).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .core.config import ConfigError
from .core.errors import LilyDeployError
from .core.modes import CACHE_INCONSISTENT
from .generation import decode, encode_prompts, left_pad, read_prompts, special_ids
from .parity_check import (Check, CandidateResult, ParityConfig, ParityReport, detect_precision,
                           normalise_precision)
from .runtime import ENGINE_SUFFIXES
from .runtime.decoder import DecoderCache, TorchDecoder, routing_modes

METRIC = "exact match"
BUILTIN = "built-in prompts (lily_deploy.decoder_export.VALIDATION_PROMPTS)"
ENCODER_FIELDS = {"metric": "a causal LM is judged on its greedy tokens and logits, not a task metric",
                  "text_column": "causal-LM prompts are the 'prompt' field of a JSONL file",
                  "label_column": "causal-LM prompts carry no labels"}


# --------------------------------------------------------------------------- results

@dataclass
class TokenDiff:
    """Two generations of the same prompts compared token by token."""

    label: str
    differ: int  # token positions that differ (a token one side lacks counts)
    total: int
    prompts: int  # prompts with at least one differing token

    def text(self) -> str:
        return f"{self.label}: {self.differ} of {self.total} tokens differ ({self.prompts} prompts)"


@dataclass
class GenerationBatch:
    """One candidate vs the reference at one batch size (``metric``: exact-match rate, the report's metric)."""

    batch_size: int
    prompts: int
    exact: int  # prompts whose every new token equals the reference's
    metric: float  # exact-match rate, percent
    reference_metric: float  # 100: the reference matches itself
    metric_delta: float
    agreement: float  # token positions equal, percent
    first_diverging_step: Optional[int]  # 1: the first new token; None: no divergence
    first_diverging_prompt: Optional[int]  # 1-based
    logits_max_abs: float  # max over the compared steps of the step's max |d|
    logits_median_abs: float  # median over the compared steps
    steps_compared: int
    finite: bool
    judged: bool  # False: a padded batch under routing that averages over padding (reported only)


@dataclass
class TokenInvariance:
    """The candidate's tokens for each prompt alone vs in each left-padded batch."""

    comparisons: list[TokenDiff]
    required: bool
    passed: Optional[bool]
    note: str = ""

    def text(self) -> str:
        if not self.comparisons:
            return self.note
        verdict = {True: "PASSED", False: "FAILED", None: "finding"}[self.passed]
        return "; ".join(c.text() for c in self.comparisons) + f" -> {verdict}" + \
            (f" ({self.note})" if self.note else "")


@dataclass
class CacheConsistency:
    """Cached per-step logits vs one pass over the same tokens, for the candidate or the torch reference."""

    who: str  # "candidate" or "torch reference"
    method: str
    max_abs: Optional[float]  # None: nothing to compare (one new token)
    limit: Optional[float]
    required: bool
    passed: Optional[bool]

    def text(self) -> str:
        if self.max_abs is None:
            return f"{self.who}: not measured (each prompt generated one token)"
        if self.passed is None:
            why = "reported: its routing is not exact under a KV cache" if not self.required else "reported"
            return f"{self.who}: {self.method}: max |d| {self.max_abs:.2e} ({why})"
        return (f"{self.who}: {self.method}: max |d| {self.max_abs:.2e} {'<=' if self.passed else '>'} "
                f"atol {self.limit:g}")


@dataclass
class DecoderResult(CandidateResult):
    """A decoder candidate's result: ``batches`` are :class:`GenerationBatch`, ``invariance`` a
    :class:`TokenInvariance`, ``cache`` its and the reference's :class:`CacheConsistency`."""

    cache: list = field(default_factory=list)


@dataclass
class RoutingDrift:
    """FINDING: the torch reference under its own routing, which is not exact under a KV cache."""

    routing: str
    prompts: int
    cached_vs_uncached: TokenDiff
    alone_vs_batched: Optional[TokenDiff]

    def text(self) -> str:
        parts = [self.cached_vs_uncached.text()] + ([self.alone_vs_batched.text()] if self.alone_vs_batched else [])
        return (f"FINDING: the torch reference under its own {self.routing} routing (as trained) is not exact "
                f"under a KV cache: {'; '.join(parts)}")


@dataclass
class GenerationParity(ParityReport):
    """The generation-parity report: truthy when every compared candidate passed (never when none was)."""

    findings: list[RoutingDrift] = field(default_factory=list)

    def to_json(self) -> dict:
        data = super().to_json()
        data["mode"] = "generation"
        data["findings"] = [dict(asdict(f), text=f.text()) for f in self.findings]
        return data

    def headers(self, markdown: bool = False) -> list[str]:
        diff = ["max abs diff", "median abs diff"] if markdown else ["max|d|", "median|d|"]
        return ["candidate", "precision", "routing", "batch", METRIC, "agree", "first diverging", *diff, "status"]

    def _rows(self, markdown: bool = False):
        rows = []
        for c in self.candidates:
            if c.status == "SKIPPED":
                rows.append([c.name, c.precision, c.routing or "-", "-", "-", "-", "-", "-", "-",
                             f"SKIPPED ({c.reason})" if markdown else "SKIPPED"])
                continue
            for k, b in enumerate(c.batches):
                first = "none" if b.first_diverging_step is None else \
                    f"step {b.first_diverging_step} (prompt {b.first_diverging_prompt})"
                rows.append([c.name if k == 0 else "", c.precision if k == 0 else "",
                             (c.routing or "-") if k == 0 else "", str(b.batch_size),
                             f"{b.metric:.2f}%" + ("" if b.judged else " *"), f"{b.agreement:.2f}%", first,
                             f"{b.logits_max_abs:.2e}", f"{b.logits_median_abs:.2e}", c.status if k == 0 else ""])
        return rows

    def _head(self) -> list[tuple[str, str]]:
        """The reference and the prompts, as (label, text) lines."""
        ref, data = self.reference, self.data
        return [("reference", f"{ref['path']} (torch, {ref['task']}, {ref['lily_layers']} Lily layers, "
                              f"{ref['folded_layers']} folded; routing as trained: {ref['routing'] or 'none'})"),
                ("prompts", f"{data['source']}: {data['prompts']} prompts x {data['max_new_tokens']} new tokens "
                            f"(greedy); batch sizes {', '.join(map(str, self.batch_sizes))} (left-padded)")]

    def table(self) -> str:
        from .report import text_table

        lines = [f"{label:<10} {text}" for label, text in self._head()]
        lines += ["", text_table(self.headers(), self._rows()), ""]
        if any(not b.judged for c in self.candidates for b in c.batches):
            lines.append("* reported, not judged: the candidate's routing averages over padding")
        for c in self.candidates:
            lines.append(f"{c.name}: {c.status}" + (f" -- {c.reason}" if c.reason else ""))
            for ch in c.checks:
                lines.append(f"  [{ {True: 'ok', False: 'FAILED', None: 'info'}[ch.passed]:>6}] {ch.detail}")
            lines += [f"  note: {note}" for note in c.notes]
        lines += [f.text() for f in self.findings] + [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        from .report import markdown_table

        out = [f"# lily-deploy generation parity: {self.verdict}", ""] + [f"- {label}: {text}" for label, text in self._head()]
        out += [f"- {self.summary()} in {self.seconds:.1f} s", "",
                markdown_table(self.headers(markdown=True), self._rows(markdown=True), align="lllrrrlrrl"), ""]
        out += ["| candidate | check | result |", "| --- | --- | --- |"]
        for c in self.candidates:
            for ch in c.checks:
                mark = {True: "ok", False: "**FAILED**", None: "info"}[ch.passed]
                out.append(f"| {c.name} | {mark} | {ch.detail.replace('|d|', 'abs diff').replace('|', '/')} |")
        if self.findings:
            out += ["", "## Findings", ""] + [f"- {f.text()}" for f in self.findings]
        if self.notes:
            out += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- one pass, no cache

class UncachedDecoder:
    """A torch decoder behind the step interface that keeps no KV cache: every step is one full
    forward over all tokens so far (the prompt mask marks the first step's tokens), so
    :func:`~lily_deploy.generation.decode` through it is uncached generation."""

    def __init__(self, decoder: TorchDecoder):
        self.decoder = decoder
        self.name, self.backend, self.vocab_size = decoder.name, decoder.backend, decoder.vocab_size
        self.max_positions = decoder.max_positions

    def start(self, batch: int) -> DecoderCache:
        return DecoderCache()

    def step(self, input_ids, attention_mask, position_ids, cache: DecoderCache):
        new = np.asarray(input_ids)
        mask = np.asarray(attention_mask)
        if cache.kv is None:
            ids, prompt = new, mask
        else:
            ids = np.concatenate([cache.kv[0], new], axis=1)
            prompt = np.concatenate([cache.kv[1], np.zeros_like(new)], axis=1)
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)  # as left_pad and decode count them
        logits, _ = self.decoder.step(ids, mask, pos, self.decoder.start(len(ids)), prompt_mask=prompt)
        return logits[:, -new.shape[1]:], DecoderCache((ids, prompt), {}, ids.shape[1])


def one_pass_gap(decoder, prompts: Sequence[Sequence[int]], tokens: list[list[int]], steps: list[np.ndarray],
                 eos: Optional[int], pad: int) -> Optional[float]:
    """Max |d| between a cached decode's per-step logits and one pass over all its generated tokens.

    The prefill runs as in the decode; then every token the decode fed (EOS after a prompt has
    stopped) goes in ONE step with the cache: past > 0 and several new tokens at once.
    """
    if len(steps) < 2:
        return None
    ids, mask, pos = left_pad(prompts, pad)
    _, cache = decoder.step(ids, mask, pos, decoder.start(len(prompts)))
    fill = pad if eos is None else eos
    fed = np.array([(list(t) + [fill] * len(steps))[:len(steps) - 1] for t in tokens], dtype=np.int64)
    mask = np.concatenate([mask, np.ones_like(fed)], axis=1)
    pos = pos[:, -1:] + 1 + np.arange(fed.shape[1])
    logits, _ = decoder.step(fed, mask, pos, cache)
    gaps = [np.abs(logits[:, k - 1].astype(np.float64) - steps[k]) for k in range(1, len(steps))]
    return float(max(g.max() for g in gaps)) if all(np.isfinite(g).all() for g in gaps) else float("inf")


# --------------------------------------------------------------------------- token comparisons

def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """The first index where two generations differ (a token one lacks counts), or None."""
    for k in range(max(len(a), len(b))):
        if k >= len(a) or k >= len(b) or a[k] != b[k]:
            return k
    return None


def token_diff(label: str, a: list[list[int]], b: list[list[int]]) -> TokenDiff:
    differ = total = prompts = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        same = sum(1 for p, q in zip(x, y) if p == q)
        differ, total, prompts = differ + n - same, total + n, prompts + (n != same)
    return TokenDiff(label, differ, total, prompts)


def step_gaps(ref_tokens, got_tokens, ref_steps, got_steps, gaps: dict) -> bool:
    """Fold each step's max |d| into ``gaps`` (step -> max), over the prompts whose tokens so far
    agree; False if the candidate gave non-finite logits there."""
    limits = []
    for a, b in zip(ref_tokens, got_tokens):
        d = first_divergence(a, b)
        limits.append(min(len(a) - 1, len(b) - 1, len(a) if d is None else d))
    finite = True
    for k in range(min(len(ref_steps), len(got_steps))):
        rows = [i for i, lim in enumerate(limits) if k <= lim]
        if not rows:
            continue
        got = got_steps[k][rows].astype(np.float64)
        if not np.isfinite(got).all():
            finite, gap = False, float("inf")
        else:
            gap = float(np.abs(got - ref_steps[k][rows]).max())
        gaps[k] = max(gaps.get(k, 0.0), gap)
    return finite


# --------------------------------------------------------------------------- the run

@dataclass
class _Setup:
    """What every comparison shares: the encoded prompts, how many tokens, the special ids."""

    prompts: list[list[int]]
    max_new_tokens: int
    eos: Optional[int]
    pad: int
    batch_sizes: list[int]
    bar: object = None

    def chunks(self, bs: int):
        return [self.prompts[s:s + bs] for s in range(0, len(self.prompts), bs)]

    def decode(self, decoder, chunk, record: bool = True):
        tokens, steps = decode(decoder, chunk, self.max_new_tokens, self.eos, self.pad, record_logits=record)
        if self.bar is not None:
            self.bar.update(len(chunk))
        return tokens, steps

    def tokens(self, decoder, bs: int) -> list[list[int]]:
        return [t for chunk in self.chunks(bs) for t in self.decode(decoder, chunk, record=False)[0]]


@dataclass
class _Candidate:
    """A decoder under test and how to run it (``skip``: why it cannot run here)."""

    name: str
    path: Path
    kind: str  # onnx, torch, engine
    backend: str
    precision: str
    routing: Optional[str]
    decoder: object = None
    skip: Optional[str] = None
    notes: list[str] = field(default_factory=list)


def run_generation_parity(config: ParityConfig, ref_model) -> GenerationParity:
    """Generation parity of every candidate against the causal-LM reference ``ref_model``."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    _check_fields(config)
    if ref_model.tokenizer is None:
        raise LilyDeployError(f"--reference {config.reference}: its base model has no tokenizer; generation "
                              "parity needs one to encode the prompts")
    ref = TorchDecoder(ref_model, "torch", allow_inconsistent_routing=True)
    texts, source = _prompt_texts(config)
    eos, pad = special_ids(ref_model.tokenizer)
    sizes, notes = _batch_sizes(config.batch_sizes, len(texts))
    setup = _Setup(encode_prompts(ref_model.tokenizer, texts, ref, config.max_new_tokens), config.max_new_tokens,
                   eos, pad, sizes)
    cands = [_open_candidate(spec, config, ref_model) for spec in config.candidates]
    trained = {name: layer.mode for name, layer in ref_model.layers.items()}
    drift = routing_modes(ref_model) & set(CACHE_INCONSISTENT)
    per_candidate = 2 * len(setup.batch_sizes) + (1 not in setup.batch_sizes and max(setup.batch_sizes) > 1)
    runs = sum(1 for c in cands if c.skip is None) * per_candidate + (3 if drift else 0)  # decodes of every prompt
    setup.bar = tqdm(total=runs * len(texts), desc="parity", unit="prompt", disable=None if config.progress else True,
                     leave=False)
    try:
        findings = [_drift(ref, setup, sorted(drift)[0])] if drift else []
        results = [_compare(c, config, ref, trained, setup) for c in cands]
    finally:
        setup.bar.close()
        _restore(ref_model, trained)
    notes += [f"no data given: {len(texts)} {BUILTIN}"] if config.data is None else []
    return GenerationParity(_reference_info(config, ref_model), _data_info(config, source, len(texts)), METRIC,
                            setup.batch_sizes, results, time.perf_counter() - started, notes, config.allow_skips,
                            findings)


def _batch_sizes(requested: Sequence[int], prompts: int) -> tuple[list[int], list[str]]:
    """The batch sizes that run (one above the number of prompts runs as one batch of them all), and notes."""
    sizes, notes = [], []
    for bs in map(int, requested):
        if bs > prompts:
            notes.append(f"batch size {bs} ran as {prompts}: there are {prompts} prompts")
        if min(bs, prompts) not in sizes:
            sizes.append(min(bs, prompts))
    return sizes, notes


def _check_fields(config: ParityConfig) -> None:
    """Refuse the encoder-only fields a user set for a causal-LM reference (they would be ignored)."""
    for name, why in ENCODER_FIELDS.items():
        if getattr(config, name) is not None:
            raise ConfigError(name, f"the reference is a causal LM: {why}")


def _prompt_texts(config: ParityConfig) -> tuple[list[str], str]:
    """The prompts (the data file's, or the built-in ones) and where they came from."""
    if config.data is None:
        from .decoder_export import VALIDATION_PROMPTS

        texts, source = list(VALIDATION_PROMPTS), BUILTIN
    else:
        texts, source = read_prompts(config.data), str(config.data)
    return (texts[:config.limit] if config.limit else texts), source


def _reference_info(config: ParityConfig, ref_model) -> dict:
    modes = sorted(routing_modes(ref_model))
    return {"path": str(config.reference), "backend": "torch-cpu", "task": ref_model.task,
            "labels": None, "lily_layers": len(ref_model.layers), "folded_layers": len(ref_model.folded or {}),
            "routing": "+".join(modes) or None, "base_model": ref_model.meta.get("base_model")}


def _data_info(config: ParityConfig, source: str, prompts: int) -> dict:
    return {"source": source, "prompts": prompts, "builtin": config.data is None,
            "max_new_tokens": config.max_new_tokens, "limit": config.limit}


def _restore(model, modes: dict) -> None:
    """Put every layer back in the routing it was loaded with (candidates re-route the reference)."""
    for name, layer in model.layers.items():
        layer.mode = modes[name]


# --------------------------------------------------------------------------- candidates

def _open_candidate(spec, config: ParityConfig, ref_model) -> _Candidate:
    """An exported decoder (onnxruntime), a model folder (torch), or an engine (TensorRT, on a GPU)."""
    path = Path(str(spec))
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        cand = _open_onnx(path, config)
    elif suffix in ENGINE_SUFFIXES:
        return _engine(path)
    elif path.is_dir():
        cand = _open_torch(path, config)
    else:
        raise LilyDeployError(f"--candidate {path}: not an .onnx file, an engine ({', '.join(ENGINE_SUFFIXES)}) "
                              "or a model folder")
    vocab = int(ref_model.model.config.vocab_size)
    if cand.decoder.vocab_size and cand.decoder.vocab_size != vocab:
        raise LilyDeployError(f"--candidate {path}: embeds {cand.decoder.vocab_size} tokens, the reference "
                              f"{config.reference} {vocab}; was it exported from another model?")
    return cand


def _open_onnx(path: Path, config: ParityConfig) -> _Candidate:
    from .runtime.decoder_ort import OrtDecoder
    from .runtime.onnx_io import load_onnx

    precision, why = detect_precision(load_onnx(path, flag="--candidate"))
    decoder = OrtDecoder(path, threads=config.threads, allow_inconsistent_routing=True, flag="--candidate")
    return _Candidate(path.name, path, "onnx", decoder.backend, precision, decoder.routing, decoder,
                      notes=[f"precision {precision}: {why}"])


def _open_torch(path: Path, config: ParityConfig) -> _Candidate:
    from .core.deploy import open_model

    model = open_model(path, base=config.base)
    if config.routing is not None and model.layers:
        model.set_routing(config.routing)
    modes = routing_modes(model)
    routing = modes.pop() if len(modes) == 1 else ("none" if not modes else None)
    decoder = TorchDecoder(model, path.name or str(path), allow_inconsistent_routing=True)
    return _Candidate(path.name or str(path), path, "torch", decoder.backend, "fp32", routing, decoder)


def _engine(path: Path) -> _Candidate:
    """A decoder engine: run through the TensorRT decoder runner where a GPU is, else skipped with the reason."""
    from .runtime import cuda_available
    from .runtime.tensorrt import check_engine_header, read_report

    check_engine_header(path, f"--candidate {path}")
    report = read_report(path) or {}
    precision = normalise_precision((report.get("precision") or {}).get("label", "fp32")) or "fp32"
    routing = (report.get("onnx") or {}).get("routing")
    if not cuda_available():
        return _Candidate(path.name, path, "engine", "tensorrt", precision, routing,
                          skip="no CUDA GPU here: a TensorRT engine runs only on a GPU (run parity on the GPU machine)")
    from .runtime.decoder_trt import TrtDecoder

    decoder = TrtDecoder(path, allow_inconsistent_routing=True, flag="--candidate")
    return _Candidate(path.name, path, "engine", "tensorrt", precision, routing, decoder)


def _reference_routing(cand: _Candidate, routing: Optional[str]) -> Optional[str]:
    """The routing the reference runs in for ``cand`` (None: as trained)."""
    recorded = cand.routing if cand.routing not in (None, "none") else None
    if routing is not None and recorded is not None and recorded != routing:
        raise LilyDeployError(f"--candidate {cand.path}: was exported with --routing {recorded}, but --routing "
                              f"{routing} was asked for the reference (drop --routing to follow each candidate)")
    return recorded or routing


# --------------------------------------------------------------------------- comparing

def _compare(cand: _Candidate, config: ParityConfig, ref: TorchDecoder, trained: dict,
             setup: _Setup) -> DecoderResult:
    """One candidate against the reference at every batch size, then invariance and cache, then judged."""
    res = DecoderResult(cand.name, str(cand.path), cand.kind, cand.backend, cand.precision, cand.routing, "PASSED",
                        notes=list(cand.notes))
    if cand.skip is not None:
        res.status, res.reason = "SKIPPED", cand.skip
        return res
    model = ref.model
    _restore(model, trained)
    routing = _reference_routing(cand, config.routing)
    if routing is not None and model.layers:
        model.set_routing(routing)
        was = sorted(set(trained.values()) - {"static"})
        if was != [routing]:
            res.notes.append(f"the torch reference was re-routed by {routing} (the candidate's routing); it was "
                             f"trained with {'+'.join(was) or 'no'} routing")
    modes = routing_modes(model) | ({cand.routing} if cand.routing else set())
    consistent = not modes & set(CACHE_INCONSISTENT)
    res.routing = routing or cand.routing or "+".join(sorted(routing_modes(model))) or "none"
    tol = config.tolerances[cand.precision]
    res.tolerance = {"logits_atol": tol.atol_for("logits"), "min_exact_match": tol.min_agreement}
    cand_gap, ref_gap, by_size = [], [], {}
    for bs in setup.batch_sizes:
        batch, tokens = _batch(cand, ref, setup, bs, consistent or bs == 1, cand_gap, ref_gap)
        res.batches.append(batch)
        by_size[bs] = tokens
    res.invariance = _invariance(cand, setup, by_size, consistent)
    ref_atol = config.tolerances["fp32"].atol_for("logits")
    method = "one uncached forward over prompt + generated tokens (prompt mask for prompt routing)"
    res.cache = [_cache("candidate", method if cand.kind == "torch" else
                        "prefill, then every generated token in one cached step", cand_gap,
                        tol.atol_for("logits"), consistent),
                 _cache("torch reference", method, ref_gap, ref_atol, consistent)]
    _judge(res, tol.atol_for("logits"), tol.min_agreement)
    return res


def _batch(cand: _Candidate, ref: TorchDecoder, setup: _Setup, bs: int, judged: bool, cand_gap: list,
           ref_gap: list) -> tuple[GenerationBatch, list[list[int]]]:
    """Reference and candidate on every prompt in left-padded batches of ``bs``: tokens, logits and
    each side's cache consistency (appended to ``cand_gap`` / ``ref_gap``)."""
    ref_tokens, got_tokens, gaps, finite = [], [], {}, True
    uncached = UncachedDecoder(ref)
    for chunk in setup.chunks(bs):
        r_tok, r_steps = setup.decode(ref, chunk)
        g_tok, g_steps = setup.decode(cand.decoder, chunk)
        finite &= step_gaps(r_tok, g_tok, r_steps, g_steps, gaps)
        own = UncachedDecoder(cand.decoder) if cand.kind == "torch" else cand.decoder
        cand_gap.append(one_pass_gap(own, chunk, g_tok, g_steps, setup.eos, setup.pad))
        ref_gap.append(one_pass_gap(uncached, chunk, r_tok, r_steps, setup.eos, setup.pad))
        ref_tokens += r_tok
        got_tokens += g_tok
    divs = [first_divergence(a, b) for a, b in zip(ref_tokens, got_tokens)]
    exact = sum(d is None for d in divs)
    first = min(((d, i) for i, d in enumerate(divs) if d is not None), default=None)
    rate = 100.0 * exact / len(divs)
    diff = token_diff("tokens", ref_tokens, got_tokens)
    values = list(gaps.values())
    return GenerationBatch(bs, len(divs), exact, rate, 100.0, rate - 100.0,
                           100.0 * (1 - diff.differ / max(diff.total, 1)),
                           None if first is None else first[0] + 1, None if first is None else first[1] + 1,
                           max(values, default=0.0), float(np.median(values)) if values else 0.0, len(values),
                           finite, judged), got_tokens


def _invariance(cand: _Candidate, setup: _Setup, by_size: dict, consistent: bool) -> TokenInvariance:
    """The candidate's tokens per prompt alone (batch 1) vs in every larger batch."""
    required = consistent and cand.precision == "fp32"
    if not any(bs > 1 for bs in by_size):
        return TokenInvariance([], required, None, "not measured: no batch size above 1")
    alone = by_size.get(1) or setup.tokens(cand.decoder, 1)
    diffs = [token_diff(f"alone vs left-padded batches of {bs}", alone, tokens)
             for bs, tokens in by_size.items() if bs > 1]
    same = all(d.differ == 0 for d in diffs)
    if required:
        return TokenInvariance(diffs, True, same)
    note = "its routing averages over the batch, as PEFT's does" if not consistent else \
        f"{cand.precision}: reported (reduced precision may flip near-ties)"
    return TokenInvariance(diffs, False, None, note)


def _cache(who: str, method: str, gaps: list, limit: Optional[float], required: bool) -> CacheConsistency:
    measured = [g for g in gaps if g is not None]
    worst = max(measured) if measured else None
    passed = None if worst is None or limit is None or not required else worst <= limit
    return CacheConsistency(who, method, worst, limit, required, passed)


def _drift(ref: TorchDecoder, setup: _Setup, routing: str) -> RoutingDrift:
    """The reference under its own (cache-inconsistent) routing: cached vs uncached, alone vs batched."""
    bs = max(setup.batch_sizes)
    cached = setup.tokens(ref, bs)
    uncached = setup.tokens(UncachedDecoder(ref), bs)
    where = f"in left-padded batches of {bs}" if bs > 1 else "one prompt at a time"
    alone = token_diff(f"alone vs in left-padded batches of {bs}", setup.tokens(ref, 1), cached) if bs > 1 else None
    return RoutingDrift(routing, len(setup.prompts),
                        token_diff(f"cached vs uncached generation ({where})", cached, uncached), alone)


def _judge(res: DecoderResult, atol: Optional[float], floor: float) -> None:
    """Checks from the measurements; FAILED when any judged check fails."""
    for b in res.batches:
        res.checks.append(_exact_check(b, floor))
    judged = [b for b in res.batches if b.judged]
    worst = max((b.logits_max_abs for b in judged), default=0.0)
    if atol is None:
        res.checks.append(Check("logits max abs", worst, None, None,
                                f"logits: max |d| {worst:.2e} (reported; {res.precision} is judged on its tokens)"))
    else:
        res.checks.append(Check("logits max abs", worst, atol, worst <= atol,
                                f"logits: max |d| {worst:.2e} {'<=' if worst <= atol else '>'} atol {atol:g} "
                                "(per step, while the tokens so far agree)"))
    for b in res.batches:
        if not b.finite:
            res.checks.append(Check("logits finite", 0.0, None, False, f"logits: non-finite values at batch "
                                                                        f"{b.batch_size}"))
    inv = res.invariance
    res.checks.append(Check("batch invariance", float(sum(d.differ for d in inv.comparisons)), 0.0, inv.passed,
                            f"batch invariance ({res.routing} routing): {inv.text()}"))
    for c in res.cache:
        res.checks.append(Check(f"cache consistency ({c.who})", c.max_abs if c.max_abs is not None else 0.0,
                                c.limit, c.passed, f"cache consistency, {c.text()}"))
    res.status = "PASSED" if all(res.checks) else "FAILED"
    if res.status == "FAILED":
        res.reason = "; ".join(c.detail for c in res.failures)


def _exact_check(b: GenerationBatch, floor: float) -> Check:
    where = "no divergence" if b.first_diverging_step is None else \
        f"first diverging at step {b.first_diverging_step} (prompt {b.first_diverging_prompt})"
    head = f"greedy tokens at batch {b.batch_size}: {b.exact} of {b.prompts} prompts identical ({b.metric:.2f}%"
    if not b.judged:
        return Check(f"exact match, batch {b.batch_size}", b.metric, None, None,
                     head + f"), {where} (reported: the routing averages over padding)")
    ok = b.metric >= floor - 1e-9
    return Check(f"exact match, batch {b.batch_size}", b.metric, floor, ok,
                 head + f" {'>=' if ok else '<'} {floor:g}%), {where}")
