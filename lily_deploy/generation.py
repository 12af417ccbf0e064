"""``generate``: text from a Lily decoder with a KV cache, on torch or onnxruntime.

Prompts are left-padded into batches (so every sequence's next token sits in the last column),
position ids count non-padding tokens, and each step feeds only the new token with the cache
of keys, values and Lily routing state. Greedy by default; ``temperature > 0`` samples
(optionally top-k / top-p) from a seeded generator, so a run is reproducible.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .core.config import ConfigError, StageConfig, as_tuple, check_choice, check_number
from .core.errors import LilyDeployError
from .core.modes import MODES

BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class GenerateConfig(StageConfig):
    """What :func:`generate` runs: the model, the prompts, how many tokens and how they are picked."""

    model: str = ""  # adapter folder, deploy checkpoint or exported decoder (.onnx)
    prompts: tuple = ()  # prompt texts
    prompts_file: Optional[str] = None  # JSONL, one object per line with a "prompt" field
    max_new_tokens: int = 32
    backend: str = "torch"
    batch_size: int = 8
    routing: Optional[str] = None  # torch: route an adapter's layers so (default: as trained)
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int = 0
    base: Optional[str] = None
    tokenizer: Optional[str] = None  # for an ONNX decoder whose base model is elsewhere
    allow_inconsistent_routing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", as_tuple(self.prompts))
        super().__post_init__()

    def validate(self) -> None:
        if not str(self.model):
            raise ConfigError("model", "a model is required")
        if not self.prompts and not self.prompts_file:
            raise ConfigError("prompts", "give prompts or a prompts file")
        check_number("max_new_tokens", self.max_new_tokens, 1, integer=True)
        check_number("batch_size", self.batch_size, 1, integer=True)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("routing", self.routing, MODES, allow_none=True)
        check_number("temperature", self.temperature, 0)
        check_number("top_k", self.top_k, 0, integer=True)
        check_number("top_p", self.top_p, 0, maximum=1, strict_min=True)
        check_number("seed", self.seed, 0, integer=True)
        if self.routing is not None and self.backend != "torch":
            raise ConfigError("routing", "an exported decoder carries its own routing; routing applies to torch")


@dataclass
class Generation:
    """One prompt's result: the generated ids and text; per-step logits when recorded."""

    prompt: str
    tokens: list[int]
    text: str
    logits: Optional[list] = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "tokens": self.tokens, "text": self.text}


@dataclass
class GenerationResult:
    model: str
    backend: str
    rows: list[Generation]
    settings: dict

    def to_json(self) -> dict:
        return {"model": self.model, "backend": self.backend, "settings": self.settings,
                "generations": [r.to_json() for r in self.rows]}


class Sampler:
    """Greedy argmax, or seeded sampling with temperature, top-k and top-p."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """``logits [B, V]`` -> token ids ``[B]``."""
        if self.temperature == 0:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / self.temperature
        if self.top_k:
            kth = np.sort(z, axis=-1)[:, -min(self.top_k, z.shape[-1])][:, None]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if self.top_p < 1.0:
            order = np.argsort(-probs, axis=-1)
            sorted_p = np.take_along_axis(probs, order, -1)
            keep = np.cumsum(sorted_p, -1) - sorted_p < self.top_p  # the smallest set reaching top_p
            mask = np.zeros_like(keep)
            np.put_along_axis(mask, order, keep, -1)
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum(-1, keepdims=True)
        return np.array([self.rng.choice(len(p), p=p) for p in probs])


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask, position_ids)`` of left-padded prompts."""
    width = max(len(p) for p in prompt_ids)
    ids = np.full((len(prompt_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        if len(p):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
    return ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None)


def decode(decoder, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_id: Optional[int], pad_id: int,
           sampler: Optional[Sampler] = None, on_token: Optional[Callable[[int, int], None]] = None,
           record_logits: bool = False) -> tuple[list[list[int]], Optional[list[np.ndarray]]]:
    """Generate for one batch of prompts: ``(tokens per prompt, logits per step [B, V] or None)``.

    A sequence stops at its EOS (kept in its tokens); the batch stops when all have, or after
    ``max_new_tokens``. ``on_token(row, token)`` is called as each token is picked.
    """
    sampler = sampler or Sampler()
    ids, mask, pos = left_pad(prompt_ids, pad_id)
    logits, cache = decoder.step(ids, mask, pos, decoder.start(len(prompt_ids)))
    tokens: list[list[int]] = [[] for _ in prompt_ids]
    done = np.zeros(len(prompt_ids), dtype=bool)
    steps = [] if record_logits else None
    for step in range(max_new_tokens):
        last = logits[:, -1]
        if steps is not None:
            steps.append(last.copy())
        nxt = sampler(last)
        for row, tok in enumerate(nxt):
            if not done[row]:
                tokens[row].append(int(tok))
                if on_token is not None:
                    on_token(row, int(tok))
        if eos_id is not None:
            done |= nxt == eos_id
        if done.all() or step == max_new_tokens - 1:
            break
        feed = np.where(done, pad_id if eos_id is None else eos_id, nxt).astype(np.int64)[:, None]
        mask = np.concatenate([mask, np.ones((len(prompt_ids), 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits, cache = decoder.step(feed, mask, pos, cache)
    return tokens, steps


def read_prompts(path: str | Path) -> list[str]:
    """The ``prompt`` field of every line of a JSONL file; one line naming the file and line otherwise."""
    from .core.data import read_prompt_table

    table = read_prompt_table(path)
    for prompt, line in zip(table.prompts, table.lines):
        if prompt is None:
            raise LilyDeployError(f"{path}: line {line} has no 'prompt' field: generation continues prompts")
    return list(table.prompts)


def open_decoder(config: GenerateConfig):
    """``(decoder, tokenizer)`` for the config's model and backend."""
    from .runtime import kind_of

    kind = kind_of(config.model)
    wanted = {"onnxruntime": "onnx", "tensorrt": "engine"}.get(config.backend)
    if wanted is not None:
        if kind != wanted:
            what = "an exported decoder (.onnx)" if wanted == "onnx" else "a decoder engine (.plan)"
            raise ConfigError("backend", f"{config.backend} runs {what}, not {config.model}")
        from .calib.readers import resolve_tokenizer
        from .runtime.onnx_io import metadata_value

        if wanted == "onnx":
            from .runtime.decoder_ort import OrtDecoder as Graph
        else:
            from .runtime.decoder_trt import TrtDecoder as Graph
        decoder = Graph(config.model, allow_inconsistent_routing=config.allow_inconsistent_routing)
        base = metadata_value(decoder.meta, "lily_deploy.base_model")
        return decoder, resolve_tokenizer(config.tokenizer, None, base, str(config.model)).tokenizer
    if kind != "torch":
        raise ConfigError("backend", f"{config.model} is an exported model: run it with backend "
                                     f"{'onnxruntime' if kind == 'onnx' else 'tensorrt'}")
    from .core.deploy import open_model
    from .runtime.decoder import TorchDecoder

    model = open_model(config.model, base=config.base)
    if config.routing is not None and model.layers:
        model.set_routing(config.routing)
    if model.tokenizer is None:
        raise LilyDeployError(f"{config.model}: its base model has no tokenizer; generation needs one")
    name = Path(str(config.model)).name or str(config.model)
    return TorchDecoder(model, name, config.allow_inconsistent_routing), model.tokenizer


def special_ids(tokenizer) -> tuple[Optional[int], int]:
    """``(eos_id, pad_id)``: a tokenizer without a pad token pads with EOS (or 0)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return eos, pad


def encode_prompts(tokenizer, prompts: Sequence[str], decoder, max_new_tokens: int) -> list[list[int]]:
    """Token ids of each prompt (no padding); refuse a prompt that, with the new tokens, exceeds the context."""
    from .core.data import prompt_ids

    limit = getattr(decoder, "max_positions", None)
    out = []
    for i, text in enumerate(prompts):
        ids = prompt_ids(tokenizer, text) if text else []  # as training tokenized the prompts
        if not ids:
            raise LilyDeployError(f"prompt {i + 1} is empty: there is nothing to continue")
        if limit and len(ids) + max_new_tokens > limit:
            raise LilyDeployError(f"prompt {i + 1} has {len(ids)} tokens; with {max_new_tokens} new tokens that "
                                  f"exceeds the model's context of {limit} positions")
        out.append(list(ids))
    return out


def generate(config: Optional[GenerateConfig] = None, /, on_token: Optional[Callable[[int, int, str], None]] = None,
             **fields) -> GenerationResult:
    """Generate a continuation for every prompt, in batches of ``batch_size`` (left-padded).

    ``on_token(prompt_index, token_id, new_text)`` streams tokens as they are picked (``new_text``: what
    the token adds to the decoded continuation).
    """
    config = GenerateConfig.resolve(config, **fields)
    prompts = list(config.prompts) + (read_prompts(config.prompts_file) if config.prompts_file else [])
    decoder, tokenizer = open_decoder(config)
    eos, pad = special_ids(tokenizer)
    encoded = encode_prompts(tokenizer, prompts, decoder, config.max_new_tokens)
    sampler = Sampler(config.temperature, config.top_k, config.top_p, config.seed)
    rows: list[Generation] = []
    for start in range(0, len(prompts), config.batch_size):
        chunk = encoded[start:start + config.batch_size]
        stream = None if on_token is None else _streamer(on_token, tokenizer, start)
        tokens, _ = decode(decoder, chunk, config.max_new_tokens, eos, pad, sampler, stream)
        for i, toks in enumerate(tokens):
            rows.append(Generation(prompts[start + i], toks, tokenizer.decode(toks, skip_special_tokens=True)))
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("prompts",)}
    return GenerationResult(str(config.model), decoder.backend, rows, settings)


def _streamer(on_token, tokenizer, offset: int):
    """Call ``on_token`` with the text each token adds (decoding the whole continuation, so sub-words join)."""
    tokens: dict[int, list[int]] = {}
    texts: dict[int, str] = {}

    def call(row, tok):
        tokens.setdefault(row, []).append(tok)
        text = tokenizer.decode(tokens[row], skip_special_tokens=True)
        on_token(offset + row, tok, text[len(texts.get(row, "")):])
        texts[row] = text

    return call


def to_jsonl(result: GenerationResult) -> str:
    return "\n".join(json.dumps(r.to_json()) for r in result.rows)
