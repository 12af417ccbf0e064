"""Fine-tuning with Lily (or a LoRA baseline) on labelled text or images, or a causal LM on
prompts and responses, in one process or DDP.

The adapter is PEFT's own (``LilyConfig`` + ``get_peft_model``; the head trains through
``modules_to_save``) and is saved with ``save_pretrained``, so PEFT, ``lily-deploy inspect`` and
``deploy.load_model`` all read the output folder. Beside it goes ``lily_deploy.json`` (base model,
task, labels in class-id order, routing, columns).

Routing:

* ``batch`` -- PEFT's forward untouched: one mixing vector per layer averaged over every token of
  the (local) batch, padding included. Under DDP each process mixes over ITS OWN local batch, so
  the result depends on the number of processes (the log says so).
* ``sample`` -- PEFT's Lily layers get the deploy semantics (one mixing vector per sample over its
  non-padding tokens, ``core.lily.hp_mix_reference``) through forward hooks on PEFT's public
  modules (:func:`route_lily_layers`); the attention mask reaches them through a forward pre-hook
  on the model. Batch-invariant, so DDP with any number of processes gives the result of one
  process with the same global batch (up to float rounding), and training matches what
  ``--routing sample`` deploys.

Causal LMs (``task="causal-lm"``, read from the model or given) learn from JSONL rows
``{"prompt", "response"}`` (loss on the response tokens; prompt labels -100) or ``{"text"}`` (loss
on every token), right-padded within a batch. Their routings are the ones exact under a KV cache
(``core.modes.DECODER_MODES``): ``prompt`` (default; the hooks get the prompt tokens -- label -100,
attention 1 -- as the mask, as ``RoutingContext.prompt_mask`` gives the deploy layer), ``causal``
(the attention mask) or ``token``; ``batch`` runs PEFT's forward for comparison, with a warning;
``sample`` is refused. Validation reports response-token accuracy (argmax next-token prediction,
the best-checkpoint metric) and perplexity (exp of the mean response-token NLL).

Distributed: launched by ``torchrun`` (``WORLD_SIZE`` > 1) it runs DDP (gloo on CPU, nccl on GPU).
``batch_size`` is the GLOBAL batch of one forward pass; each global batch is cut into contiguous,
complementary slices, one per rank (no DistributedSampler), and the loss is scaled so the averaged
gradient equals the single-process gradient of the global batch. Dropout masks are drawn per
process, so the match with one process is exact only for models without dropout.

Output folder ``OUT``: the best adapter by validation accuracy (PEFT files + sidecar),
``train_log.jsonl``, and ``checkpoints/last`` (trainable weights, optimizer, scheduler, step, RNG
states of every rank) written atomically every ``save_every`` steps, at every evaluation and at the
end; ``resume=True`` continues from it, losing at most the steps since.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .core.config import ConfigError, StageConfig, check_choice, check_number
from .core.errors import LilyDeployError
from .core.peft_bridge import check_peft_version, target_of

METHODS = ("lily", "lora")
ROUTINGS = ("batch", "sample")  # encoders
CAUSAL_ROUTINGS = ("prompt", "causal", "token", "batch")  # causal LMs: DECODER_MODES, and PEFT's for comparison
SAMPLE_ON_DECODER = ("sample is refused for causal LMs: its mean over a sample's tokens changes as tokens are "
                     "generated, so cached keys and values go stale; use prompt or causal")
# Llama-family decoders: every projection of attention and MLP, as the paper's LLaMA runs adapt
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT = Path("checkpoints") / "last"
LOG_FILE = "train_log.jsonl"
HEAD_NAMES = ("classifier", "score", "head", "fc")
# settings that must not change between a run and its --resume
RESUME_KEYS = ("model", "task", "method", "rank", "lp_stride", "num_hp", "scale", "targets", "routing", "batch_size",
               "grad_accum", "lr", "weight_decay", "warmup", "max_length", "seed", "train", "train_size",
               "text_column", "label_column", "lora_rank", "max_grad_norm")
# PEFT releases whose Lily forward tests/test_training_peft.py pins (pyproject.toml carries the same bounds)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


# ---------------------------------------------------------------- the config
@dataclass(frozen=True)
class FinetuneConfig(StageConfig):
    """Everything one :func:`finetune` run needs; see :func:`finetune` for what the fields mean.

    Optional fields are None only where None means "absent": no ``val`` (keep the last step), no
    ``targets`` (PEFT's defaults for the model type), no ``lora_rank`` (matched to Lily's count),
    no ``max_steps`` (train ``epochs``), no ``eval_every`` (each epoch), no ``max_grad_norm`` (no
    clipping), no ``train_size``/``val_size`` (all rows), no columns (detected), no ``log`` (stderr).
    Two depend on the model and :func:`finetune` makes them concrete before any work: ``task``
    None is read from the model folder's ``config.json``, and ``routing`` None is the task's
    default (``prompt`` for a causal LM trained with Lily, ``sample`` for other Lily models, which
    is what ``export`` deploys; ``batch`` for LoRA, where routing does not apply).
    """

    model: str
    train: str | os.PathLike
    output: str | os.PathLike
    val: Optional[str | os.PathLike] = None
    task: Optional[str] = None
    method: str = "lily"
    rank: int = 16
    lp_stride: int = 2
    num_hp: int = 4
    scale: float = 1.0
    targets: Optional[Sequence[str]] = None
    lora_rank: Optional[int] = None
    epochs: float = 3.0
    max_steps: Optional[int] = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: float = 0.06
    max_grad_norm: Optional[float] = 1.0
    max_length: int = 128
    seed: int = 0
    eval_every: Optional[int] = None
    save_every: int = 100
    routing: Optional[str] = None
    text_column: Optional[str] = None
    label_column: Optional[str] = None
    train_size: Optional[int] = None
    val_size: Optional[int] = None
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True
    log: Optional[Callable[[str], None]] = None

    def validate(self) -> None:
        from .core.models import TASKS

        self._check_paths()
        check_choice("task", self.task, TASKS, allow_none=True)
        check_choice("method", self.method, METHODS)
        self._check_routing()
        for name in ("rank", "lp_stride", "num_hp", "batch_size", "grad_accum", "max_length", "save_every"):
            check_number(name, getattr(self, name), 1, integer=True)
        for name in ("max_steps", "eval_every", "lora_rank", "train_size", "val_size"):
            check_number(name, getattr(self, name), 1, integer=True, allow_none=True)
        check_number("epochs", self.epochs, 0, strict_min=True)
        for name in ("lr", "warmup", "weight_decay"):
            check_number(name, getattr(self, name), 0)
        check_number("max_grad_norm", self.max_grad_norm, 0, allow_none=True)
        check_number("scale", self.scale)
        check_number("seed", self.seed, 0, 2**32 - 1, integer=True)  # numpy's seed range
        self._check_names()
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError("device", f"{self.device!r}: expected cpu, cuda, cuda:N or auto")

    def _check_paths(self) -> None:
        for name in ("model", "train", "output", "val"):
            value = getattr(self, name)
            if value is None and name == "val":
                continue
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise ConfigError(name, f"expected a path, got {value!r}")

    def _check_routing(self) -> None:
        """The routing choices are the task's: a causal LM's must be exact under a KV cache."""
        task = self.task or detect_task(self.model)
        if task == "causal-lm":
            for name in ("text_column", "label_column"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, "applies to classification data; causal-LM data is JSONL with "
                                            "prompt/response or text fields")
        if self.routing is None:
            return
        if task == "causal-lm":
            if self.routing == "sample":
                raise ConfigError("routing", SAMPLE_ON_DECODER)
            check_choice("routing", self.routing, CAUSAL_ROUTINGS)
        elif self.routing not in ROUTINGS:
            raise ConfigError("routing", f"{self.routing!r}: choose one of {', '.join(ROUTINGS)} for a "
                                         f"{task or 'classification'} model ({', '.join(CAUSAL_ROUTINGS[:3])} "
                                         "are for causal LMs)")
        if self.method == "lora" and self.routing != "batch":
            raise ConfigError("routing", f"{self.routing} applies to Lily only; LoRA has no router")

    def _check_names(self) -> None:
        """``targets`` a list of module names (a bare string would be read letter by letter); columns names."""
        if self.targets is not None:
            if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
                raise ConfigError("targets", f"expected a list of module names, got {self.targets!r}")
            if not any(t.strip() for t in self.targets):
                raise ConfigError("targets", "expected module names, e.g. query,value")
        for name in ("text_column", "label_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(name, f"expected a column name, got {value!r}")


def detect_task(model) -> Optional[str]:
    """The task of base-model spec ``model`` from its ``config.json``, loading nothing; None when it names no model.

    The same rule as :func:`lily_deploy.core.models.hf_task` (the loader's), so what the config
    checks is what ``load_base`` later builds.
    """
    from types import SimpleNamespace

    from .core.models import hf_task, resolve_base

    try:
        kind, path = resolve_base(str(model))
    except LilyDeployError:
        return None  # the load reports it, naming the model
    if kind == "timm":
        return "image-cls"
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return hf_task(SimpleNamespace(architectures=config.get("architectures"), model_type=config.get("model_type", "")))


def resolve_model_fields(config: FinetuneConfig) -> FinetuneConfig:
    """``config`` with ``task`` read from the model and ``routing`` set to the task's default where None."""
    from .core.models import TASKS

    task = config.task or detect_task(config.model)
    if task not in TASKS:  # a token-classification or QA checkpoint: the data says what to train
        task = None
    routing = config.routing
    if routing is None:  # Lily trains as it deploys: sample (encoders) / prompt (decoders) are export's defaults
        routing = ("prompt" if task == "causal-lm" else "sample") if config.method == "lily" else "batch"
    return config.replace(task=task, routing=routing)


@dataclass
class FinetuneResult:
    """What a run produced: where, how good, how big, how fast."""

    output_dir: Path
    best_val_accuracy: Optional[float]
    best_step: Optional[int]
    steps: int
    trainable_params: int
    adapter_params: int
    head_params: int
    method: str
    lily_params: int  # the Lily adapter count the run was matched to (== adapter_params for lily)
    lora_rank: Optional[int]
    samples_per_s: float
    train_seconds: float
    world_size: int
    final_loss: Optional[float] = None
    history: list = field(default_factory=list)
    task: Optional[str] = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        return d


# ---------------------------------------------------------------- data
@dataclass
class LabelledData:
    """Items (texts or image files) with class ids."""

    path: Path
    items: list
    labels: list[int]
    kind: str  # "text" or "image"

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class LMData:
    """Causal-LM rows of one file (``core.data.PromptTable``); :meth:`encode` adds their token ids."""

    path: Path
    flag: str  # the option that named the file, for messages
    table: Any
    examples: list = field(default_factory=list)  # (input ids, labels) per row
    terms: list = field(default_factory=list)  # labelled next-token predictions per row: its loss terms

    def __len__(self) -> int:
        return len(self.table)

    def encode(self, tokenizer, max_length: int, vocab_size: int, model_name: str) -> None:
        """Token ids and labels of every row; a row with nothing to learn or ids past the vocabulary is one line."""
        from .core.data import IGNORE_INDEX, lm_example

        t = self.table
        self.examples, self.terms = [], []
        for prompt, response, text, line in zip(t.prompts, t.responses, t.texts, t.lines):
            ids, labels = lm_example(tokenizer, prompt, response if prompt is not None else text, max_length)
            where = f"{self.flag} {self.path}: line {line}"
            terms = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
            if prompt is not None and labels[:1] != [IGNORE_INDEX]:
                raise LilyDeployError(f"{where}: the prompt tokenizes to no tokens")
            if terms == 0:
                raise LilyDeployError(f"{where}: no token to learn within max_length {max_length} (the prompt "
                                      f"takes {labels.count(IGNORE_INDEX)}); raise max_length")
            if max(ids) >= vocab_size:
                raise LilyDeployError(f"{where}: the tokenizer of {model_name} gives token id {max(ids)}, past "
                                      f"the model's vocabulary of {vocab_size}")
            self.examples.append((ids, labels))
            self.terms.append(terms)


@dataclass
class TrainingData:
    """The training and (optional) validation rows, the label map both use (None for a causal LM), and the task."""

    train: LabelledData | LMData
    val: Optional[LabelledData | LMData]
    label_map: Any
    task: str


def _subset(n: int, size: Optional[int], seed: int) -> list[int]:
    idx = list(range(n))
    if size is None or size >= n:
        return idx
    rng = random.Random(seed)
    rng.shuffle(idx)
    return sorted(idx[:size])


def _read_rows(path, flag: str, size: Optional[int], config: FinetuneConfig) -> tuple[list, list, str]:
    """``(items, labels, kind)`` of one data file or image folder, cut to a seeded subset of ``size`` rows."""
    from .core.data import ImageFolder, read_data

    try:
        table = read_data(path, text_column=config.text_column, label_column=config.label_column,
                          require_labels=True)
    except LilyDeployError as exc:
        raise LilyDeployError(f"{flag}: {exc}") from None
    if isinstance(table, ImageFolder):
        items, labels, kind = table.files, table.labels, "image"
    else:
        items, labels, kind = table.texts, table.labels, "text"
    keep = _subset(len(items), size, config.seed)
    return [items[i] for i in keep], [labels[i] for i in keep], kind


def _read_val(config: FinetuneConfig, label_map, kind: str) -> LabelledData:
    """The validation rows, which must be the training data's kind and use only its labels."""
    val, train = config.val, config.train
    items, labels, v_kind = _read_rows(val, "--val", config.val_size, config)
    if v_kind != kind:
        raise LilyDeployError(f"--val {val}: holds {v_kind} data but --train {train} holds {kind} data")
    for row, v in enumerate(labels, start=1):
        if str(v) not in label_map.index:
            raise LilyDeployError(
                f"--val {val}: row {row} has label {v!r}, which is not in --train {train} "
                f"(train labels: {', '.join(label_map.labels)})"
            )
    return LabelledData(Path(val), items, label_map.encode(labels, f"--val {val}"), kind)


def _read_lm(path, flag: str, size: Optional[int], config: FinetuneConfig) -> LMData:
    """One causal-LM JSONL file, cut to a seeded subset of ``size`` rows; prompt routing needs a prompt per row."""
    from .core.data import read_prompt_table

    try:
        table = read_prompt_table(path, require_response=True)
    except LilyDeployError as exc:
        raise LilyDeployError(f"{flag}: {exc}") from None
    table = table.select(_subset(len(table), size, config.seed))
    if config.routing == "prompt" and config.method == "lily":
        plain = [line for line, prompt in zip(table.lines, table.prompts) if prompt is None]
        if plain:
            raise LilyDeployError(f"{flag} {path}: line {plain[0]} is a plain text, which has no prompt for prompt "
                                  "routing to mix by; give prompt/response rows, or train with routing causal or token")
    return LMData(Path(path), flag, table)


def load_data(config: FinetuneConfig) -> TrainingData:
    """The run's data; every way it can be unusable is a one-line error naming the file."""
    from .core.data import LabelMap

    train = config.train
    if config.task == "causal-lm":
        rows = _read_lm(train, "--train", config.train_size, config)
        val = _read_lm(config.val, "--val", config.val_size, config) if config.val is not None else None
        return TrainingData(rows, val, None, "causal-lm")
    items, labels, kind = _read_rows(train, "--train", config.train_size, config)
    if not items:
        raise LilyDeployError(f"--train {train}: no examples")
    label_map = LabelMap.from_values(labels)
    if len(label_map) < 2:
        raise LilyDeployError(
            f"--train {train}: every example has label {label_map.labels[0]!r}; classification needs at least 2 classes"
        )
    train_data = LabelledData(Path(train), items, label_map.encode(labels, f"--train {train}"), kind)
    val_data = _read_val(config, label_map, kind) if config.val is not None else None
    task = "image-cls" if kind == "image" else "seq-cls"
    if config.task is not None and config.task != task:
        raise LilyDeployError(f"--train {train}: holds {kind} data, which a {config.task} model cannot learn")
    return TrainingData(train_data, val_data, label_map, task)


# ---------------------------------------------------------------- targets and parameter counts
def head_name(model) -> str:
    """The classification head's attribute name (trained in full through ``modules_to_save``)."""
    from torch import nn

    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise LilyDeployError(
        f"cannot find the classification head of {type(model).__name__} (looked for {', '.join(HEAD_NAMES)})"
    )


def _in_head(name: str, head) -> bool:
    """Whether ``name`` lies in the head (a module name, or a list of the modules trained in full)."""
    heads = [head] if isinstance(head, str) else list(head or [])
    return any(re.match(rf"(^|.*\.){re.escape(h)}($|\..*)", name) is not None for h in heads)


def linear_modules(model, head: Optional[str]) -> dict[str, Any]:
    """The Linears that may be targets: not in the classification ``head``, not a causal LM's output layer."""
    from torch import nn

    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not output and not _in_head(n, head)}


def conv1d_modules(model) -> list[str]:
    """transformers' ``Conv1D`` layers (GPT-2's c_attn, c_proj, c_fc): PEFT's Lily adapts ``nn.Linear`` only."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


def abbreviate(names: Sequence[str], limit: int = 12) -> str:
    """``encoder.layer.{0..5}.attention.self.query, ...``: layer indices collapsed, the list cut short."""
    patterns: dict[str, list[set]] = {}
    for name in names:
        parts = name.split(".")
        nums = [p for p in parts if p.isdigit()]
        key = ".".join("#" if p.isdigit() else p for p in parts)
        slots = patterns.setdefault(key, [set() for _ in nums])
        for slot, num in zip(slots, nums):
            slot.add(int(num))
    out = []
    for key, slots in patterns.items():
        text = key
        for slot in slots:
            vals = sorted(slot)
            rng = (f"{{{vals[0]}..{vals[-1]}}}" if len(vals) > 1 and vals == list(range(vals[0], vals[-1] + 1))
                   else (str(vals[0]) if len(vals) == 1 else "{" + ",".join(map(str, vals)) + "}"))
            text = text.replace("#", rng, 1)
        out.append(text)
    more = f", ... ({len(out) - limit} more)" if len(out) > limit else ""
    return ", ".join(out[:limit]) + more


# attention projections by the names architectures give them, (query, value) pairs first, then fused q/k/v
ATTENTION_PAIRS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("query_proj", "value_proj"),
                   ("q", "v"))
FUSED_QKV = ("qkv_proj", "Wqkv", "qkv", "query_key_value", "in_proj", "c_attn")


def _derived_targets(linears) -> Optional[list[str]]:
    """Query and value projections (or a fused q/k/v projection) among the model's own Linear layers."""
    leaves = {n.rsplit(".", 1)[-1] for n in linears}
    for pair in ATTENTION_PAIRS:
        if all(t in leaves for t in pair):
            return list(pair)
    return next(([t] for t in FUSED_QKV if t in leaves), None)


def default_targets(model, model_name: str, linears, decoder: bool) -> tuple[list[str], str]:
    """``(targets, where they come from)``: a decoder's projections of :data:`DECODER_TARGETS`, PEFT's default
    for the model type where every entry is a Linear of the model, else derived from its Linear layers."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LILY_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if decoder:
        present = [t for t in DECODER_TARGETS if any(target_of(n, [t]) for n in linears)]
        if present:
            return present, f"the attention and MLP projections of {model_type}"
    peft_default = defaults.get(model_type)
    if isinstance(peft_default, list) and all(any(target_of(n, [t]) for n in linears) for t in peft_default):
        return list(peft_default), f"PEFT's default for {model_type}"
    derived = _derived_targets(linears)
    if derived:
        return derived, f"the attention projections among {model_type}'s Linear layers"
    conv = conv1d_modules(model)
    if conv:  # GPT-2: PEFT's default (c_attn) is a Conv1D
        first = next((t for t in peft_default or [] if any(target_of(n, [t]) for n in conv)),
                     conv[0].rsplit(".", 1)[-1])
        raise _no_linear(model, first, None, model_name, linears)
    have = f"its Linear modules are: {abbreviate(list(linears))}" if linears else "it has no Linear modules to adapt"
    raise LilyDeployError(f"no default targets for {model_name} ({model_type}): no query/value or q/k/v projection "
                          f"among its Linear layers; name them with --targets; {have}")


def _no_linear(model, t: str, head: Optional[str], model_name: str, linears) -> LilyDeployError:
    """The error for target ``t`` matching no Linear: a GPT-2 style Conv1D is named as such."""
    have = f"its Linear modules are: {abbreviate(list(linears))}" if linears else "it has no Linear modules to adapt"
    conv = [n for n in conv1d_modules(model) if target_of(n, [t])]
    if conv:
        return LilyDeployError(f"targets {t!r} of {model_name} are transformers Conv1D layers ({abbreviate(conv, 3)})"
                               f": its attention uses Conv1D, which PEFT's Lily refuses (nn.Linear only); {have}")
    why = f" (the head {head!r} is trained in full and cannot be a target)" if head else ""
    return LilyDeployError(f"targets {t!r} matches no Linear module of {model_name}{why}; {have}")


def resolve_targets(model, targets: Optional[Sequence[str]], head, model_name: str,
                    decoder: Optional[bool] = None) -> tuple[list[str], list[str]]:
    """``(targets, adapted layer names)``; a target that matches no Linear is an error listing those that exist.

    ``head``: the classification head, or a list of the modules trained in full (never targets);
    None for a causal LM. ``decoder`` (default: ``head`` is None) picks a decoder's default targets.
    """
    linears = linear_modules(model, head)
    decoder = head is None if decoder is None else decoder
    targets = default_targets(model, model_name, linears, decoder)[0] if not targets else targets
    targets = list(dict.fromkeys(t.strip() for t in targets if t and t.strip()))
    for t in targets:
        if not any(target_of(n, [t]) for n in linears):
            raise _no_linear(model, t, head, model_name, linears)
    adapted = [n for n in linears if target_of(n, targets)]
    for n in adapted:
        ends = [t for t in targets if n.endswith(t)]
        if len(ends) > 1:
            raise LilyDeployError(
                f"targets {ends[0]!r} and {ends[1]!r} both end layer {n}; PEFT would share its LP and HP pool with "
                "either group at random; name each kind of layer by one entry"
            )
    return targets, adapted


def lily_param_count(model, adapted: Sequence[str], targets: Sequence[str], rank: int, num_hp: int,
                     stride: int) -> int:
    """Trainable Lily parameters, counted the way PEFT shares them (without building the adapter).

    PEFT groups adapted layers by (:func:`target_of`, weight shape): one HP pool ``num_hp*r x
    d_out`` per group, one LP ``r x d_in`` per ``stride`` consecutive layers of a group, one
    router ``num_hp x r`` per layer.
    """
    modules = dict(model.named_modules())
    groups: dict[tuple, int] = {}
    for name in adapted:
        key = (target_of(name, targets), tuple(modules[name].weight.shape))
        groups[key] = groups.get(key, 0) + 1
    total = 0
    for (_, (d_out, d_in)), layers in groups.items():
        total += num_hp * rank * d_out + math.ceil(layers / stride) * rank * d_in + layers * rank * num_hp
    return total


def lora_rank_for(model, adapted: Sequence[str], budget: int) -> tuple[int, int]:
    """``(rank, params)`` of the LoRA on the same layers whose parameter count is closest to ``budget``."""
    modules = dict(model.named_modules())
    per_rank = sum(modules[n].in_features + modules[n].out_features for n in adapted)
    low = max(1, budget // per_rank)
    rank = min((low, low + 1), key=lambda r: (abs(r * per_rank - budget), r))
    return rank, rank * per_rank


# ---------------------------------------------------------------- PEFT's Lily: version guard and routing
class RoutingHooks:
    """The hooks :func:`route_lily_layers` set; ``remove()`` gives the layers PEFT's own routing back.

    ``context`` is a ``core.lily.RoutingContext``: its ``mask`` is the attention mask of the
    forward pass in flight; for ``prompt`` routing set ``context.prompt_mask`` (the prompt's
    non-padding tokens, ``[B, T]``) before each forward, as on a deploy model's context. Both
    are cleared when the forward ends, so a later batch never sees a stale mask; without a
    prompt mask every unmasked token counts as prompt, as in the deploy layer.
    """

    def __init__(self, context, handles: list) -> None:
        self.context = context
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _token_mask(mask, h):
    """The model's attention mask when it lines up with this layer's tokens ``h [B, T, r]``, else None."""
    if mask is None or h.dim() != 3 or mask.dim() != 2 or tuple(mask.shape) != tuple(h.shape[:2]):
        return None
    return mask


def _mode_mask(context, mode: str, h):
    """The mask routing ``mode`` mixes over, as the deploy layer picks it: prompt tokens for ``prompt``
    (the attention mask when none is set), the attention mask for ``sample`` and ``causal``, none otherwise."""
    if mode == "prompt":
        prompt = _token_mask(context.prompt_mask, h)
        return prompt if prompt is not None else _token_mask(context.mask, h)
    if mode in ("sample", "causal"):
        return _token_mask(context.mask, h)
    return None


def _hook_layer(layer, context, mode: str) -> list:
    """Hooks that make one PEFT Lily layer add ``hp_mix_reference(mode)`` instead of its batch mix.

    PEFT's forward runs as it is (its dtype casts, adapter switches, shared LPs): a hook on its
    ``base_layer`` keeps the base output, one on each ``lily_router[adapter]`` keeps the router's
    input ``h`` and logits, and the layer's own forward hook returns base + our update in place
    of PEFT's result. PEFT's own mix is computed and dropped (an ``r x d_out`` matmul a token).
    When the adapter is disabled no router runs and PEFT's output stands.
    """
    from .core.lily import hp_mix_reference

    seen: dict = {}

    def keep_base(module, args, output):
        seen.clear()  # the base layer runs first in every call: a fresh record
        seen["base"] = output

    def keep_router(adapter):
        def hook(module, args, output):
            seen.setdefault("routed", []).append((adapter, args[0], output))
        return hook

    def mix(module, args, output):
        base, routed = seen.pop("base", None), seen.pop("routed", [])
        if base is None or not routed:
            return None
        result = base
        for adapter, h, logits in routed:
            mask = _mode_mask(context, mode, h)
            delta = hp_mix_reference(h, logits, module.lily_B[adapter].weight, mask, mode, module.scaling[adapter])
            result = result + delta.to(result.dtype)
        return result

    handles = [layer.base_layer.register_forward_hook(keep_base)]
    handles += [router.register_forward_hook(keep_router(a)) for a, router in layer.lily_router.items()]
    handles.append(layer.register_forward_hook(mix))
    return handles


def route_lily_layers(peft_model, mode: str = "sample") -> RoutingHooks:
    """Give every PEFT Lily layer of ``peft_model`` the deploy layer's routing ``mode``, through hooks.

    The layers stay PEFT's (saving, loading and parameter names are unchanged) and so does their
    ``forward``; ``mode="batch"`` reproduces PEFT's result, which the tests use to pin PEFT's math.
    The decoder modes ``prompt`` and ``causal`` mix over whole sequences from their start
    (training and full forwards: no KV cache, no routing state).
    """
    from peft.tuners.lily.layer import LilyLayer

    from .core.lily import RoutingContext
    from .core.modes import DYNAMIC_MODES, STATE_MODES

    check_peft_version()
    if mode not in DYNAMIC_MODES + STATE_MODES:
        raise LilyDeployError(f"routing {mode!r}: choose one of {', '.join(DYNAMIC_MODES + STATE_MODES)}")
    context = RoutingContext()
    handles: list = []
    for module in peft_model.modules():
        if isinstance(module, LilyLayer):
            handles += _hook_layer(module, context, mode)
    if not handles:
        raise LilyDeployError(f"routing {mode}: the model has no Lily layers")

    def keep_mask(module, args, kwargs):
        context.mask = kwargs.get("attention_mask")

    def drop_mask(module, args, kwargs, output):
        context.mask = context.prompt_mask = None

    handles.append(peft_model.register_forward_pre_hook(keep_mask, with_kwargs=True))
    handles.append(peft_model.register_forward_hook(drop_mask, with_kwargs=True, always_call=True))
    return RoutingHooks(context, handles)


# ---------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Dist:
    """One process, or DDP when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LilyDeployError(f"device {device!r}: CUDA is not available on this machine")
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def split_for_rank(items: Sequence, rank: int, world: int) -> list:
    """Contiguous slice ``rank`` of ``world`` near-equal slices (ranks together cover ``items`` once)."""
    n = len(items)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (1 if rank < extra else 0)])


def _barrier(d: Dist) -> None:
    """Under DDP, wait for every rank (a no-op in one process)."""
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def _all_reduce(values, d: Dist):
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    if d.active:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- schedule and checkpoints
def lr_factor(step: int, warmup_steps: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at ``total``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Schedule:
    """The run's length, learning-rate shape and data order, from the config and the number of training rows."""

    rows: int
    batch_size: int
    grad_accum: int
    seed: int
    micro_per_epoch: int  # global batches in one pass over the data
    steps_per_epoch: int
    total: int
    warmup_steps: int
    eval_every: int

    @classmethod
    def plan(cls, config: FinetuneConfig, rows: int) -> "Schedule":
        micro = math.ceil(rows / config.batch_size)
        per_epoch = math.ceil(micro / config.grad_accum)
        total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
        warmup = int(round(config.warmup * total)) if config.warmup < 1 else int(config.warmup)
        return cls(rows, config.batch_size, config.grad_accum, config.seed, micro, per_epoch, total, warmup,
                   config.eval_every or per_epoch)

    def lr_factor(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total)

    def micro_batches(self, step: int, world: int) -> list[list[int]]:
        """The global batches (row indices) of optimizer step ``step``: a seeded order per epoch, and no
        batch smaller than the number of processes (each rank needs a row)."""
        import torch

        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
        bs = self.batch_size
        chunks = [order[i * bs:(i + 1) * bs]
                  for i in range(k * self.grad_accum, min((k + 1) * self.grad_accum, self.micro_per_epoch))]
        return [c for c in chunks if len(c) >= world]


def _rng_state(device) -> dict:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _readable(folder: Path) -> None:
    """safetensors writes 0600 files; outputs get the umask's usual permissions."""
    from .core.fileio import publish_mode

    for p in folder.iterdir():
        if p.is_file():
            publish_mode(p)


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict, rng_states: list) -> None:
    """Everything a resume needs, swapped in atomically (a crash leaves the previous one)."""
    import torch
    from safetensors.torch import save_file

    from .core.fileio import atomic_dir

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path, "-o") as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
                  str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states},
                   tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        _readable(tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[dict, list]:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    params = _trainable(model)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise LilyDeployError(f"--resume: checkpoint {path} does not fit this model (no {missing[0]})")
    with torch.no_grad():
        for n, t in tensors.items():
            if n not in params or tuple(params[n].shape) != tuple(t.shape):
                raise LilyDeployError(f"--resume: checkpoint {path} does not fit this model ({n})")
            params[n].copy_(t)
    blob = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return json.loads((path / "state.json").read_text()), blob["rng"]


def save_adapter(out: Path, model, sidecar: dict) -> None:
    """The PEFT adapter into ``out`` itself, file by file through atomic renames."""
    from .core.adapters import SIDECAR

    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", suffix=".partial", dir=out))
    try:
        model.save_pretrained(str(tmp))
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        _readable(tmp)
        # weights first: the config and sidecar never change within a run
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        files.sort(key=lambda n: (not n.endswith(".safetensors"), n))
        for name in files:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)




# ---------------------------------------------------------------- the model
@dataclass
class BuiltModel:
    """A PEFT model ready to train, and how its adapter was sized."""

    peft_model: Any
    head: Optional[str]  # the classification head (None for a causal LM)
    targets: list[str]
    adapted: list[str]
    lily_params: int  # Lily's adapter count at the given rank/num_hp/stride
    lora_rank: int  # the LoRA rank matched to it (or the one asked for)
    lora_params: int
    hooks: Optional[RoutingHooks] = None  # the routing hooks, for any routing but PEFT's own batch
    saved: list = field(default_factory=list)  # every module trained in full (modules_to_save): head, new modules
    new_modules: list = field(default_factory=list)  # the modules the base load initialised at random
    targets_from: Optional[str] = None  # where default targets came from (None: the user named them)


def build_model(base, method: str = "lily", rank: int = 16, lp_stride: int = 2, num_hp: int = 4,
                scale: float = 1.0, targets: Optional[Sequence[str]] = None, lora_rank: Optional[int] = None,
                routing: str = "batch") -> BuiltModel:
    """Wrap a loaded :class:`~lily_deploy.models.BaseModel` in PEFT's Lily (or the matched LoRA), head trainable.

    Seed the global RNG first: the adapter's (and a new head's) initialisation draws from it.
    """
    from peft import get_peft_model

    from .core.models import TASK_TO_PEFT_TASK

    from .core.models import new_modules

    head = head_name(base.model) if base.task != "causal-lm" else None
    fresh = new_modules(base.model, getattr(base, "new_weights", []))
    saved = list(dict.fromkeys(([head] if head else []) + fresh))
    targets_from = None
    if not targets:
        targets, targets_from = default_targets(base.model, base.spec, linear_modules(base.model, saved),
                                                decoder=head is None)
    targets, adapted = resolve_targets(base.model, targets, saved or None, base.spec, decoder=head is None)
    lily_count = lily_param_count(base.model, adapted, targets, rank, num_hp, lp_stride)
    matched_rank, lora_count = lora_rank_for(base.model, adapted, lily_count)
    if lora_rank:
        matched_rank, lora_count = lora_rank, lora_rank * lora_rank_for(base.model, adapted, 0)[1]  # rank 1's count
    task_type = TASK_TO_PEFT_TASK.get(base.task)
    to_save = list(saved) or None  # PEFT adds its task's head names to this list in place
    if method == "lily":
        from peft import LilyConfig

        check_peft_version()
        config = LilyConfig(r=rank, stride_A=lp_stride, num_B=num_hp, scaling=scale, target_modules=targets,
                            modules_to_save=to_save, task_type=task_type)
    else:
        from peft import LoraConfig

        config = LoraConfig(r=matched_rank, lora_alpha=2 * matched_rank, lora_dropout=0.0, target_modules=targets,
                            modules_to_save=to_save, task_type=task_type)
    with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(base.model, config)
    hooks = route_lily_layers(peft_model, routing) if method == "lily" and routing != "batch" else None
    return BuiltModel(peft_model, head, list(targets), adapted, lily_count, matched_rank, lora_count, hooks,
                      saved=saved, new_modules=fresh, targets_from=targets_from)


@dataclass
class Prepared:
    """A run's data and PEFT model (on its device), with the trainable parameters and their counts."""

    data: TrainingData
    base: Any
    built: BuiltModel
    params: dict
    trainable: int
    adapter: int

    @property
    def head(self) -> int:
        return self.trainable - self.adapter


def _encode_lm(data: TrainingData, base, config: FinetuneConfig) -> None:
    """Tokenize causal-LM rows with the base's tokenizer, which must be able to pad a batch."""
    from .core.data import lm_pad_id

    tokenizer = base.tokenizer
    if tokenizer is None:
        raise LilyDeployError(f"--model {config.model}: has no tokenizer, so prompts and responses cannot be encoded")
    if lm_pad_id(tokenizer) is None:
        raise LilyDeployError(f"--model {config.model}: its tokenizer has neither a pad nor an EOS token to pad "
                              "batches with")
    vocab = base.model.get_input_embeddings().num_embeddings
    for part in (data.train, data.val):
        if part is not None:
            part.encode(tokenizer, config.max_length, vocab, base.spec)


def prepare(config: FinetuneConfig, d: Dist) -> Prepared:
    """Data, then the model, seeded in between: the head's and the adapter's initialisation draw from the global RNG."""
    import numpy as np
    import torch

    from .core.models import load_base

    data = load_data(config)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    if data.task == "causal-lm":
        base = load_base(config.model, task=data.task)
        _encode_lm(data, base, config)
    else:
        base = load_base(config.model, task=data.task, num_labels=len(data.label_map), labels=data.label_map.labels)
    if base.task != data.task:
        raise LilyDeployError(f"--model {config.model}: a {base.task} model cannot learn {data.task} data")
    built = build_model(base, method=config.method, rank=config.rank, lp_stride=config.lp_stride,
                        num_hp=config.num_hp, scale=config.scale, targets=config.targets, lora_rank=config.lora_rank,
                        routing=config.routing)
    built.peft_model.to(d.device)
    params = _trainable(built.peft_model)
    trainable = sum(p.numel() for p in params.values())
    adapter = sum(p.numel() for n, p in params.items() if not _in_head(n, built.saved))
    return Prepared(data, base, built, params, trainable, adapter)


def _ddp_note(config: FinetuneConfig, d: Dist) -> str:
    """What DDP does to this run's result (batch routing mixes per process)."""
    if config.method == "lora":
        note = "LoRA has no router: same result as one process with the same global batch"
    elif config.routing == "batch":
        note = (f"each process mixes over its own local batch (about {config.batch_size // d.world} of the global "
                f"{config.batch_size}), so results depend on the process count; use --routing "
                f"{'prompt' if config.task == 'causal-lm' else 'sample'} for batch-invariant training")
    else:
        note = "batch-invariant routing: same result as one process with the same global batch"
    return (f"DDP: {d.world} processes ({'nccl' if d.device.type == 'cuda' else 'gloo'}), "
            f"routing {config.routing}: {note}")


def describe_run(config: FinetuneConfig, p: Prepared, d: Dist, say: Callable[[str], None]) -> None:
    """The run's opening lines: what is adapted, how many parameters train, and what DDP means for it."""
    b, causal = p.built, p.data.task == "causal-lm"
    what = f"routing {config.routing}" if causal else f"{len(p.data.label_map)} labels"
    say(f"finetune: {config.method} on {p.base.spec} ({p.data.task}, {what}, "
        f"{len(b.adapted)} layers: {abbreviate(b.adapted, 4)})")
    head = "" if not b.saved else f" + head {p.head:,}"
    if b.targets_from:
        say(f"targets {', '.join(b.targets)} ({b.targets_from}; --targets to choose others)")
    if b.new_modules:
        say(f"trained in full, newly initialised by the base load: {', '.join(b.new_modules)}")
    say(f"trainable parameters: Lily adapter {b.lily_params:,} (r {config.rank}, {config.num_hp} HPs, LP stride "
        f"{config.lp_stride}) vs LoRA adapter {b.lora_params:,} (r {b.lora_rank}); this run: {config.method} "
        f"{p.adapter:,}{head} = {p.trainable:,}")
    if causal and config.method == "lily" and config.routing == "batch":
        say("warning: routing batch is PEFT's mix over every token of the batch, padding included; a generation with "
            "a KV cache mixes over other tokens (the prompt at prefill, one token a step), so it will not match "
            "training: use it for comparison, and prompt or causal to deploy")
    if d.active:
        say(_ddp_note(config, d))


def run_settings(config: FinetuneConfig, p: Prepared) -> dict:
    """The settings a ``resume`` must share with the run it continues (kept in the log and the checkpoint)."""
    run = {k: getattr(config, k) for k in RESUME_KEYS}
    run.update(model=str(config.model), targets=p.built.targets,
               lora_rank=p.built.lora_rank if config.method == "lora" else None,
               train=str(Path(config.train).resolve()))
    return run


def sidecar_for(config: FinetuneConfig, p: Prepared) -> dict:
    """``lily_deploy.json`` of the saved adapter: what deploying it needs besides PEFT's files."""
    model = str(config.model)
    return {
        "base_model": p.base.spec if (p.base.spec != model or not Path(model).exists()) else str(Path(model).resolve()),
        "task": p.data.task,
        "labels": p.data.label_map.labels if p.data.label_map is not None else None,
        "routing": config.routing if config.method == "lily" else None,
        "method": config.method,
        "text_column": config.text_column,
        "label_column": config.label_column,
        "max_length": config.max_length,
    }


# ---------------------------------------------------------------- the training run
def _echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _silent(msg: str) -> None:
    """What ranks other than the main one say: nothing (rank 0 speaks for the run)."""


@dataclass
class _Faults:
    """Faults the tests inject into a run (``monkeypatch.setattr(training._FAULTS, ...)``); never set otherwise."""

    nan_at_step: Optional[int] = None  # that (1-based) step's loss becomes NaN: a diverged step
    stop_after_step: Optional[int] = None  # KeyboardInterrupt once that step is done: a killed run


_FAULTS = _Faults()


class RunLog:
    """``train_log.jsonl``: one JSON record a line, written by the main process (a resumed run appends)."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int] = None) -> None:
        self.path = path
        if enabled and resume_step is not None and path.is_file():
            self._truncate(resume_step)
        self._file = open(path, "a", encoding="utf-8") if enabled else None

    def _truncate(self, step: int) -> None:
        """Drop the records of steps after the checkpoint a run resumes from: they are run again."""
        from .core.fileio import atomic_file

        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill that made this resume necessary
            if not isinstance(record, dict) or record.get("event") or int(record.get("step", 0)) <= step:
                kept.append(line)
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class StepStats:
    """What one optimizer step did: its mean loss, gradient norm (before clipping), rows and seconds."""

    loss: float
    grad_norm: float
    samples: int
    seconds: float


def make_optimizer(params: dict, config: FinetuneConfig, schedule: Schedule):
    """AdamW (weight decay on matrices only) and the warm-up + cosine schedule."""
    import torch

    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    # a plain function, which LambdaLR leaves out of its state_dict (the schedule is rebuilt on resume)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.lr_factor(step))
    return optimizer, scheduler


class ClassifierTask:
    """What a classification run feeds the model and scores: one loss term a row, accuracy over rows."""

    def __init__(self, p: Prepared, config: FinetuneConfig, device) -> None:
        self.base, self.max_length, self.device = p.base, config.max_length, device

    def terms(self, data: LabelledData, idx: Sequence[int]) -> int:
        return len(idx)

    def batch(self, data: LabelledData, idx: Sequence[int]) -> tuple[dict, Any]:
        import torch

        from .core.data import encode_batch

        inputs = encode_batch(self.base, [data.items[i] for i in idx], self.max_length)
        labels = torch.tensor([data.labels[i] for i in idx], device=self.device)
        return {k: v.to(self.device) for k, v in inputs.items()}, labels

    def forward(self, model, inputs: dict, targets) -> tuple[Any, Any]:
        """``(loss per term, whether each term's prediction is right)``."""
        import torch.nn.functional as F

        logits = model(**inputs).logits.float()
        return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1) == targets

    def metrics(self, correct: float, loss: float, terms: float, rows: float) -> dict:
        return {"val_accuracy": correct / max(terms, 1), "val_loss": loss / max(terms, 1), "val_size": int(rows)}

    def line(self, m: dict) -> str:
        return f"val accuracy {m['val_accuracy']:.4f}, val loss {m['val_loss']:.4f}"


class LMTask:
    """What a causal-LM run feeds the model and scores: a loss term per labelled next-token prediction.

    For ``prompt`` routing the hooks' context gets each batch's prompt mask (label -100 and
    attention 1) before the forward, as a deploy model's ``context.prompt_mask`` would.
    """

    def __init__(self, p: Prepared, config: FinetuneConfig, device) -> None:
        from .core.data import lm_pad_id

        self.device, self.pad_id = device, lm_pad_id(p.base.tokenizer)
        hooks = p.built.hooks
        self.context = hooks.context if hooks is not None and config.routing == "prompt" else None

    def terms(self, data: LMData, idx: Sequence[int]) -> int:
        return sum(data.terms[i] for i in idx)

    def batch(self, data: LMData, idx: Sequence[int]) -> tuple[dict, Any]:
        from .core.data import lm_batch

        enc = {k: v.to(self.device) for k, v in lm_batch([data.examples[i] for i in idx], self.pad_id).items()}
        labels = enc.pop("labels")
        return enc, labels

    def forward(self, model, inputs: dict, targets) -> tuple[Any, Any]:
        import torch.nn.functional as F

        from .core.data import IGNORE_INDEX

        if self.context is not None:
            self.context.prompt_mask = (targets == IGNORE_INDEX) & inputs["attention_mask"].bool()
        logits = model(**inputs).logits[:, :-1]
        nexts = targets[:, 1:]
        keep = nexts != IGNORE_INDEX
        scored, wanted = logits[keep].float(), nexts[keep]
        return F.cross_entropy(scored, wanted, reduction="none"), scored.argmax(-1) == wanted

    def metrics(self, correct: float, loss: float, terms: float, rows: float) -> dict:
        nll = loss / max(terms, 1)
        return {"val_accuracy": correct / max(terms, 1), "val_loss": nll,
                "val_perplexity": math.exp(nll) if nll < 700 else float("inf"), "val_size": int(rows),
                "val_tokens": int(terms)}

    def line(self, m: dict) -> str:
        return (f"val response-token accuracy {m['val_accuracy']:.4f}, perplexity {m['val_perplexity']:.4g}, "
                f"val loss {m['val_loss']:.4f}")


class Trainer:
    """One run over a prepared model: its optimizer and schedule, and step, evaluate, checkpoint and resume."""

    def __init__(self, config: FinetuneConfig, d: Dist, say: Callable[[str], None], out: Path, p: Prepared):
        self.config, self.d, self.say, self.out, self.p = config, d, say, out, p
        self.model = p.built.peft_model
        self.train_model = self.model  # wrapped in DDP by open() when distributed
        self.task = (LMTask if p.data.task == "causal-lm" else ClassifierTask)(p, config, d.device)
        self.schedule = Schedule.plan(config, len(p.data.train))
        self.optimizer, self.scheduler = make_optimizer(p.params, config, self.schedule)
        self.ckpt_path = out / CHECKPOINT
        self.settings = run_settings(config, p)
        self.sidecar = sidecar_for(config, p)
        self.start, self.best_acc, self.best_step = 0, None, None
        self.last_ckpt: Optional[int] = None
        self.history: list = []
        self.recent: list[float] = []
        self.samples_done, self.train_time, self.last_loss = 0, 0.0, None
        self.log: Optional[RunLog] = None

    # ---- start or resume
    def resume(self) -> None:
        """Weights, optimizer, schedule, step and RNG from ``checkpoints/last``; refused when settings differ."""
        import torch

        d, total = self.d, self.schedule.total
        state, rng_states = load_checkpoint(self.ckpt_path, self.model, self.optimizer, self.scheduler)
        saved = state["config"]
        # a key the checkpoint lacks is one added since it was written (task: it then was a classifier's)
        diffs = [f"{k} {self.settings.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in RESUME_KEYS
                 if k in saved and saved[k] != self.settings.get(k)]
        if diffs:
            raise LilyDeployError(f"--resume: settings differ from the checkpoint's run: {'; '.join(diffs)}")
        if state["total_steps"] != total:
            self.say(f"resume: the run now has {total} steps (was {state['total_steps']}); the LR schedule changes")
        self.start, self.best_acc, self.best_step = state["step"], state["best_val_accuracy"], state["best_step"]
        self.last_ckpt = self.start
        self.history = state.get("history", [])
        if len(rng_states) == d.world:
            _set_rng_state(rng_states[d.rank], d.device)
        else:
            self.say(f"resume: checkpoint was written by {len(rng_states)} processes, now {d.world}; "
                     "dropout RNG reseeded")
            torch.manual_seed(self.config.seed + 1000 * self.start + d.rank)
        best = "-" if self.best_acc is None else f"{self.best_acc:.4f}"
        self.say(f"resume: from step {self.start} of {total} ({self.ckpt_path}); best val accuracy so far {best}")

    def open(self) -> None:
        """Resume or start afresh; then the output folder, the log's first record and, under DDP, the wrapper."""
        import torch

        c, d, b = self.config, self.d, self.p.built
        if c.resume:
            self.resume()
        elif d.active:
            torch.manual_seed(c.seed + d.rank)  # distinct dropout per rank; weights were made before this
        if d.main:
            self.out.mkdir(exist_ok=True)
        _barrier(d)
        self.log = RunLog(self.out / LOG_FILE, d.main, self.start if c.resume else None)
        if c.resume:
            self.log.write({"event": "resume", "step": self.start})
        else:
            self.log.write({"event": "start", "config": self.settings, "world_size": d.world,
                            "steps": self.schedule.total, "trainable_params": self.p.trainable,
                            "adapter_params": self.p.adapter, "lily_params": b.lily_params,
                            "lora_rank": b.lora_rank, "lora_params": b.lora_params})
        if d.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    # ---- one step, evaluation, checkpoint
    def step(self, step: int) -> StepStats:
        """Optimizer step ``step`` over its ``grad_accum`` global batches; a non-finite loss or gradient stops the run.

        The loss is the mean over the step's loss terms (rows, or a causal LM's response tokens)
        of the whole global step, so each rank scales its sum by the same global count.
        """
        import torch

        d, t0, data = self.d, time.perf_counter(), self.p.data.train
        chunks = self.schedule.micro_batches(step, d.world)
        n_step = sum(self.task.terms(data, c) for c in chunks)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, chunk in enumerate(chunks):
            inputs, labels = self.task.batch(data, split_for_rank(chunk, d.rank, d.world))
            sync = self.train_model.no_sync() if d.active and i < len(chunks) - 1 else contextlib.nullcontext()
            with sync:
                losses, _ = self.task.forward(self.train_model, inputs, labels)
                if _FAULTS.nan_at_step == step + 1:
                    losses = losses * float("nan")
                (losses.sum() * (d.world / n_step)).backward()
            loss_sum += losses.detach().sum().double().cpu()
        total_loss, = _all_reduce([loss_sum.item()], d)
        step_loss = total_loss / n_step
        if not math.isfinite(step_loss):
            raise self.diverged(step, f"the loss is {step_loss}")
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.p.params.values()),
                                                   self.config.max_grad_norm or float("inf"))
        if not torch.isfinite(grad_norm):
            raise self.diverged(step, f"the gradient norm is {grad_norm.item()}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(step_loss, float(grad_norm), sum(len(c) for c in chunks), time.perf_counter() - t0)

    def evaluate(self) -> dict:
        """Accuracy and mean loss over the validation loss terms, each rank taking its slice of every batch."""
        import torch

        d, val, bs = self.d, self.p.data.val, self.config.batch_size
        self.model.eval()
        correct = loss = terms = rows = 0.0
        with torch.no_grad():
            for s in range(0, len(val), bs):
                idx = split_for_rank(range(s, min(s + bs, len(val))), d.rank, d.world)
                if not idx:
                    continue
                inputs, labels = self.task.batch(val, idx)
                losses, right = self.task.forward(self.model, inputs, labels)
                loss += losses.sum().item()
                correct += right.sum().item()
                terms += losses.numel()
                rows += len(idx)
        correct, loss, terms, rows = _all_reduce([correct, loss, terms, rows], d)
        self.model.train()
        return self.task.metrics(correct, loss, terms, rows)

    def checkpoint(self, step: int) -> None:
        """``checkpoints/last`` at ``step`` (with every rank's RNG); refused while a parameter is not finite."""
        import torch

        d = self.d
        for n, p in self.p.params.items():
            if not torch.isfinite(p).all():
                raise self.diverged(step, f"parameter {n} is not finite")
        rng = [_rng_state(d.device)]
        if d.active:
            import torch.distributed as dist

            rng = [None] * d.world
            dist.all_gather_object(rng, _rng_state(d.device))
        if d.main:
            state = {"step": step, "total_steps": self.schedule.total, "best_val_accuracy": self.best_acc,
                     "best_step": self.best_step, "config": self.settings, "world_size": d.world,
                     "history": self.history[-1000:]}
            save_checkpoint(self.ckpt_path, self.model, self.optimizer, self.scheduler, state, rng)
        self.last_ckpt = step
        _barrier(d)

    def diverged(self, step: int, what: str) -> LilyDeployError:
        """The one-line stop for a diverged step: where the last good checkpoint and best adapter are."""
        kept = (f"the last good checkpoint (step {self.last_ckpt}) is kept in {self.ckpt_path}"
                if self.last_ckpt is not None else "no checkpoint had been written yet")
        best = f" and the best adapter (step {self.best_step}) in {self.out}" if self.best_step is not None else ""
        return LilyDeployError(f"training diverged at step {step + 1}: {what}. Stopped; {kept}{best}. "
                               f"Lower --lr (now {self.config.lr:g}) or raise --warmup")

    # ---- the loop
    def _record(self, done: int, stats: StepStats, bar) -> None:
        """Step ``done``'s numbers into the totals, the progress bar and the log."""
        self.train_time += stats.seconds
        self.samples_done += stats.samples
        self.last_loss = stats.loss
        self.recent = (self.recent + [stats.loss])[-20:]
        sps = self.samples_done / max(self.train_time, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(self.recent) / len(self.recent):.4f}", samples_s=f"{sps:.1f}")
        self.log.write({"step": done, "epoch": round(done / self.schedule.steps_per_epoch, 4),
                        "loss": round(stats.loss, 6), "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": round(stats.grad_norm, 6), "samples_per_s": round(sps, 2)})

    def _evaluate_and_keep(self, done: int, loss: float, bar) -> None:
        """Evaluate at step ``done``; a better accuracy than any before replaces the saved adapter."""
        metrics = self.evaluate()
        improved = self.best_acc is None or metrics["val_accuracy"] > self.best_acc
        if improved:
            self.best_acc, self.best_step = metrics["val_accuracy"], done
            if self.d.main:
                save_adapter(self.out, self.model, {**self.sidecar, "best": {"step": done, **metrics}})
        record = {"step": done, "train_loss": round(loss, 6), **metrics, "best": improved}
        self.history.append(record)
        self.log.write({"event": "eval", **record})
        line = f"step {done}/{self.schedule.total}: {self.task.line(metrics)}{' (best)' if improved else ''}"
        if self.d.main and self.config.progress:
            bar.write(line, file=sys.stderr)
        else:
            self.say(line)

    def after_step(self, done: int, stats: StepStats, bar) -> None:
        """Log step ``done``, then evaluate, save and checkpoint when it is time."""
        total, val = self.schedule.total, self.p.data.val
        self._record(done, stats, bar)
        evaluated = val is not None and (done % self.schedule.eval_every == 0 or done == total)
        if evaluated:
            self._evaluate_and_keep(done, stats.loss, bar)
        if val is None and done == total and self.d.main:
            save_adapter(self.out, self.model, self.sidecar)
        if evaluated or done % self.config.save_every == 0 or done == total:
            self.checkpoint(done)
        if _FAULTS.stop_after_step is not None and done >= _FAULTS.stop_after_step:
            raise KeyboardInterrupt(f"stopped after step {done} (test fault)")

    def train(self) -> None:
        """Steps ``start`` to the last; an interrupt says which checkpoint a resume will continue from."""
        from tqdm.auto import tqdm

        c = self.config
        self.model.train()
        desc = f"{c.method} {c.routing}" if c.method == "lily" else c.method
        bar = tqdm(total=self.schedule.total, initial=self.start, disable=not (c.progress and self.d.main),
                   file=sys.stderr, unit="step", dynamic_ncols=True, desc=desc)
        step = self.start
        try:
            for step in range(self.start, self.schedule.total):
                self.after_step(step + 1, self.step(step), bar)
        except KeyboardInterrupt:
            kept = (f"checkpoint at step {self.last_ckpt} in {self.ckpt_path}" if self.last_ckpt is not None
                    else "no checkpoint yet")
            self.say(f"interrupted during step {step + 1}: {kept}; continue with --resume")
            raise
        finally:
            bar.close()

    def finish(self) -> FinetuneResult:
        """The log's last record, the closing line, and the result."""
        total, b = self.schedule.total, self.p.built
        sps = self.samples_done / max(self.train_time, 1e-9)
        self.log.write({"event": "done", "steps": total, "best_val_accuracy": self.best_acc,
                        "best_step": self.best_step, "samples_per_s": round(sps, 2)})
        best = "-" if self.best_acc is None else f"{self.best_acc:.4f}"
        metric = "response-token accuracy" if self.p.data.task == "causal-lm" else "accuracy"
        self.say(f"done: {total} steps; best val {metric} {best} at step {self.best_step}; adapter in {self.out}")
        return FinetuneResult(
            output_dir=self.out, best_val_accuracy=self.best_acc, best_step=self.best_step, steps=total,
            trainable_params=self.p.trainable, adapter_params=self.p.adapter, head_params=self.p.head,
            method=self.config.method, lily_params=b.lily_params,
            lora_rank=b.lora_rank if self.config.method == "lora" else None, samples_per_s=sps,
            train_seconds=self.train_time, world_size=self.d.world, final_loss=self.last_loss, history=self.history,
            task=self.p.data.task,
        )

    def run(self) -> FinetuneResult:
        """Start (or resume), train to the last step and report; the log is closed however it ends."""
        try:
            self.open()
            self.train()
            return self.finish()
        finally:
            if self.log is not None:
                self.log.close()


def check_output(config: FinetuneConfig) -> Path:
    """The output folder, if this run may write there: not an input, empty unless resumed or overwritten."""
    from .core.fileio import check_not_input, check_output_parent

    out = check_output_parent(config.output, "-o")
    check_not_input(out, {"--model": config.model, "--train": config.train, "--val": config.val}, "-o")
    if out.exists() and not out.is_dir():
        raise LilyDeployError(f"-o {out}: exists and is not a folder")
    ckpt_path = out / CHECKPOINT
    if config.resume and not (ckpt_path / "state.json").is_file():
        raise LilyDeployError(f"--resume: {ckpt_path} does not exist (no earlier run to continue in -o {out})")
    if not config.resume and not config.overwrite and out.exists() and any(out.iterdir()):
        raise LilyDeployError(f"-o {out}: folder is not empty; pass --resume to continue the run in it "
                              f"or --overwrite to start over")
    return out


def _clear_output(config: FinetuneConfig, d: Dist, out: Path) -> None:
    """``overwrite``: empty the folder (main process), every rank waiting until it is."""
    if d.main and config.overwrite and not config.resume and out.exists():
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    _barrier(d)


def finetune(config: Optional[FinetuneConfig] = None, /, **fields: Any) -> FinetuneResult:
    """Fine-tune ``model`` (a spec for :func:`lily_deploy.models.load_base`) on ``train``; keep the best adapter.

    ``method="lily"`` trains PEFT's Lily (``rank``, ``lp_stride`` layers per LP, ``num_hp`` HPs
    per pool, ``scale``) on ``targets``; ``method="lora"`` trains PEFT's LoRA on the same layers
    at the rank whose parameter count is closest to that Lily's (``lora_rank`` overrides), with
    ``lora_alpha = 2 * rank``. ``warmup`` < 1 is a fraction of the steps, >= 1 a number of steps.
    Training length: ``max_steps`` optimizer steps if given, else ``epochs``.
    ``batch_size`` is the global batch of one forward pass (split across DDP ranks); an optimizer
    step takes ``grad_accum`` of them. With ``routing="batch"`` under DDP each rank mixes over its
    local slice only (PEFT semantics per process); ``"sample"`` is batch-invariant.
    A causal LM (``task="causal-lm"``, or read from the model) learns the responses of JSONL
    prompt/response rows (or whole ``text`` rows) with ``routing`` prompt (default), causal, token
    or batch (PEFT's, for comparison); the best step is the one of highest response-token accuracy.
    Takes a :class:`FinetuneConfig`, its fields as keywords, or both (the keywords win).
    """
    config = resolve_model_fields(FinetuneConfig.resolve(config, **fields))
    out = check_output(config)
    d = init_distributed(config.device)
    say = (config.log or _echo) if d.main else _silent
    try:
        _clear_output(config, d, out)
        prepared = prepare(config, d)
        describe_run(config, prepared, d, say)
        return Trainer(config, d, say, out, prepared).run()
    finally:
        if d.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
