"""``fold``: router paths that are static (or nearly so, within a measured budget) go into W0.

For a frozen mixing vector ``p`` a Lily layer is exactly ``W0 + s * (A^T B~(p))^T``: a plain
Linear, with no adapter cost left at inference. A layer is folded exactly when its router is
static by design (already ``static``, a zero router, or identical HPs); under ``auto`` more
layers are folded -- those whose mixing vectors vary least -- while the task metric on the
calibration data and each layer's output error stay within budget.

Decoders fold under a routing that is exact with a KV cache (``prompt``, ``causal`` or
``token``; by default the one they were trained with), calibrate on prompt/response JSONL and
measure greedy next-token agreement with the unfolded model on the response tokens, teacher
forced (prompt + response in one pass, the prompt tokens as ``RoutingContext.prompt_mask``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

from .core.config import ConfigError, StageConfig, check_choice, check_number
from .core.errors import LilyDeployError
from .core.lily import LilyLinear, hp_mix_reference, mix_pool
from .core.modes import CACHE_INCONSISTENT, DECODER_MODES, DYNAMIC_MODES, STATE_MODES

FOLD_CHOICES = ("auto", "all", "none")
FOLD_MODES = DYNAMIC_MODES + STATE_MODES  # encoders: batch, sample, token; decoders: prompt, causal, token
REPORT = "fold_report.json"


@dataclass(frozen=True)
class FoldConfig(StageConfig):
    """What :func:`fold` folds and within which budget; the fields are its keyword parameters.

    ``strategy`` "auto" folds the most layers whose metric drop on the calibration data stays
    within ``max_metric_drop`` points and whose relative output error stays within
    ``max_output_error`` (None: no such limit); "all" folds every layer; "none" only reports.
    Calibration uses ``size`` rows of ``calib`` (a causal LM: prompt/response JSONL) or, with
    ``random_inputs``, random inputs (the metric is then top-1 agreement with the unfolded
    model; a decoder's: next-token agreement at every position). ``routing`` is the routing of
    the layers left dynamic, and of the reference the budget is measured against; None means
    ``sample`` for encoders and, for decoders, the routing the adapter was trained with when it
    is exact under a KV cache (prompt, causal, token), else ``prompt``.
    """

    source: str | Path
    output: str | Path
    calib: Optional[str | Path] = None
    strategy: str = "auto"
    max_metric_drop: float = 0.1
    max_output_error: Optional[float] = None
    routing: Optional[str] = None  # encoders: sample; decoders: as trained (prompt, causal or token), else prompt
    size: int = 256
    batch_size: int = 32
    max_length: int = 128
    text_column: Optional[str] = None
    label_column: Optional[str] = None
    random_inputs: bool = False
    base: Optional[str] = None
    progress: bool = True

    def validate(self) -> None:
        check_choice("strategy", self.strategy, FOLD_CHOICES)
        check_number("max_metric_drop", self.max_metric_drop, minimum=0)
        check_number("max_output_error", self.max_output_error, minimum=0, allow_none=True)
        check_choice("routing", self.routing, FOLD_MODES, allow_none=True)
        for name in ("size", "batch_size", "max_length"):
            check_number(name, getattr(self, name), minimum=1, integer=True)
        if self.calib is None and not self.random_inputs:
            raise ConfigError("calib", "fold needs calibration data (or random inputs)")


@dataclass
class LayerDecision:
    name: str
    folded: bool
    reason: str
    spread: float
    output_error: float
    mean_p: list[float]


@dataclass
class FoldReport:
    strategy: str
    routing: str
    metric_name: str
    metric_before: float
    metric_after: float
    max_metric_drop: float
    max_output_error: Optional[float]
    samples: int
    layers: list[LayerDecision] = field(default_factory=list)

    @property
    def folded(self) -> list[str]:
        return [d.name for d in self.layers if d.folded]

    def to_json(self) -> dict:
        out = asdict(self)
        out["folded_layers"] = len(self.folded)
        out["dynamic_layers"] = len(self.layers) - len(self.folded)
        return out

    def table(self) -> str:
        lines = [f"{'layer':<48} {'decision':<9} {'spread':>8} {'out err':>9}  reason"]
        for d in self.layers:
            lines.append(f"{d.name:<48} {'folded' if d.folded else 'dynamic':<9} {d.spread:>8.4f} "
                         f"{d.output_error:>9.2e}  {d.reason}")
        lines.append(f"{len(self.folded)}/{len(self.layers)} layers folded ({self.strategy}); "
                     f"{self.metric_name} on calibration data {self.metric_before:.2f} -> {self.metric_after:.2f} "
                     f"(budget: drop <= {self.max_metric_drop})")
        return "\n".join(lines)


@dataclass
class LMBatch:
    """One batch of causal-LM calibration rows, teacher forced: the model inputs (right-padded),
    the prompt tokens ``prompt`` routing mixes over (None: every non-padding token, as when
    generating from the whole sequence), and the positions whose greedy next token is compared."""

    inputs: dict
    prompt_mask: Optional[torch.Tensor]  # [B, T] bool
    scored: torch.Tensor  # [B, T] bool
    metric: str = "response-token agreement"

    def run(self, model) -> torch.Tensor:
        """The logits ``[B, T, V]`` with the prompt mask on the model's routing context, cleared after."""
        ctx = model.context
        ctx.prompt_mask = self.prompt_mask
        try:
            return model.logits(**self.inputs)
        finally:
            ctx.prompt_mask = None


def _run(model, batch) -> torch.Tensor:
    """The logits of one calibration batch (a dict of model inputs, or an :class:`LMBatch`)."""
    return batch.run(model) if isinstance(batch, LMBatch) else model.logits(**batch)


def _rows(batch) -> int:
    """How many samples a calibration batch holds (the report counts them)."""
    inputs = batch.inputs if isinstance(batch, LMBatch) else batch
    return next(iter(inputs.values())).shape[0]


def static_by_design(layer: LilyLinear) -> Optional[str]:
    """Why a layer's mixing cannot depend on its input, or None when it can."""
    if layer.mode == "static":
        return "static mode"
    if not torch.any(layer.router.weight):
        return "zero router (uniform mixing)"
    pool = layer.hp.weight.reshape(layer.num_hp, layer.rank, -1)
    if torch.equal(pool, pool[:1].expand_as(pool)):
        return "identical HPs"
    return None


@torch.no_grad()
def output_errors(model, batches: list, means: dict[str, torch.Tensor], routing: str = "sample") -> dict[str, float]:
    """Per layer: ||y(p_mean) - y(dynamic)|| / ||y(dynamic)|| over the batches, one pass.

    The dynamic output is the layer's own routing (``routing`` for a layer already static), over
    the mask it mixes by (a decoder's prompt mask under ``prompt``); padding never counts.
    """
    from .calib.router_stats import prompt_mask_for

    num = {n: 0.0 for n in means}
    den = {n: 0.0 for n in means}
    hooks = []
    for name, layer in model.layers.items():
        if name not in means:
            continue

        def hook(mod, args, out, name=name, layer=layer):
            x = args[0]
            h = layer.lp(x.to(layer.lp.weight.dtype))
            mask = layer.mask_for(h)
            mode = routing if layer.mode == "static" else layer.mode
            mix_mask = prompt_mask_for(layer, h) if mode == "prompt" else None
            dyn = hp_mix_reference(h, layer.router(h), layer.hp.weight, mask if mix_mask is None else mix_mask,
                                   mode, layer.scale)
            fixed = (h @ mix_pool(means[name].to(h.dtype), layer.hp.weight, layer.rank)) * layer.scale
            diff, ref = fixed - dyn, out
            if mask is not None:
                w = mask.to(diff.dtype).unsqueeze(-1)
                diff, ref = diff * w, ref * w
            num[name] += float(diff.pow(2).sum())
            den[name] += float(ref.pow(2).sum())

        hooks.append(layer.register_forward_hook(hook))
    try:
        for batch in batches:
            _run(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: (num[n] / den[n]) ** 0.5 if den[n] > 0 else 0.0 for n in means}


@torch.no_grad()
def evaluate(model, batches: list, labels: Optional[list[int]], reference: Optional[list[int]] = None):
    """Accuracy (%) against labels, else top-1 agreement (%) with ``reference`` predictions.

    A decoder's predictions are its greedy next tokens at the scored positions of each batch.
    """
    preds = []
    for batch in batches:
        top = _run(model, batch).argmax(-1)
        preds.extend((top[batch.scored] if isinstance(batch, LMBatch) else top).tolist())
    target = labels if labels is not None else reference
    if target is None:
        return preds, 100.0
    return preds, 100.0 * sum(int(p == t) for p, t in zip(preds, target)) / max(len(target), 1)


def _apply(model, names: Iterable[str], means: dict[str, torch.Tensor]) -> dict:
    """Fold ``names`` in place; returns the replaced layers so the change can be undone."""
    from .core.peft_bridge import set_module

    undo = {}
    for name in names:
        layer = model.model.get_submodule(name)
        if not isinstance(layer, LilyLinear):
            continue
        undo[name] = layer
        set_module(model.model, name, layer.folded_linear(means[name]))
        model.folded[name] = [round(float(v), 8) for v in means[name]]
    return undo


def _undo(model, undo: dict) -> None:
    from .core.peft_bridge import set_module

    for name, layer in undo.items():
        set_module(model.model, name, layer)
        model.folded.pop(name, None)


def fold_routing(model, routing: Optional[str]) -> str:
    """The routing a model folds under: ``routing``, or (None) encoders ``sample`` and decoders as trained.

    A decoder must route so that generation with a KV cache is exact (``prompt``, ``causal`` or
    ``token``): the reference the budget is measured against is then what it deploys.
    """
    from .runtime.decoder import routing_modes

    if model.task != "causal-lm":
        routing = routing or "sample"
        if routing not in DYNAMIC_MODES:
            raise ConfigError("routing", f"{routing} routing is for decoders; an encoder routes by "
                                         f"{', '.join(DYNAMIC_MODES)}")
        return routing
    trained = routing_modes(model)
    default = next(iter(trained)) if len(trained) == 1 and trained <= set(DECODER_MODES) else "prompt"
    routing = routing or default
    if routing in CACHE_INCONSISTENT:
        raise ConfigError("routing", f"{routing} routing is not exact under a KV cache (its mixing vector changes "
                                     "as tokens are generated); a decoder folds under prompt, causal or token routing")
    return routing


def resolve_for(model, config: FoldConfig) -> FoldConfig:
    """``config`` with its routing resolved for ``model``; fields a causal LM has no use for are refused."""
    if model.task == "causal-lm":
        for name in ("text_column", "label_column"):
            if getattr(config, name) is not None:
                raise ConfigError(name, "a causal LM calibrates on prompt/response JSONL, which has no columns "
                                        "to name")
    return config.replace(routing=fold_routing(model, config.routing))


def fold_model(model, batches: list, labels: Optional[list[int]], config: FoldConfig) -> FoldReport:
    """Fold layers of a loaded deploy model in place and say why, layer by layer.

    ``batches`` are dicts of model inputs, or (decoders) :class:`LMBatch` es. Of ``config`` only
    the budget is read: ``strategy``, ``max_metric_drop``, ``max_output_error``, ``routing``
    (None: see :func:`fold_routing`) and ``progress``.
    """
    from .calib.router_stats import collect

    routing = fold_routing(model, config.routing)
    model.set_routing(routing)
    layers = model.layers
    if not layers:
        raise LilyDeployError("the model has no Lily layers left to fold")
    stat_mode = routing if model.task == "causal-lm" else "sample"  # the vectors a layer's variation is read from
    stats = collect(model, batches, stat_mode, run=lambda batch: _run(model, batch)) if batches else {}
    means, reasons = _mixing_vectors(layers, stats)
    errors = output_errors(model, batches, means, stat_mode) if batches else {n: 0.0 for n in layers}
    reference, before = evaluate(model, batches, labels)
    cal = _Calibration(model, batches, labels, reference, before, means)
    report = FoldReport(config.strategy, routing, _metric_name(batches, labels), before, before,
                        config.max_metric_drop, config.max_output_error, samples=sum(_rows(b) for b in batches))
    exact = [n for n in layers if reasons[n] is not None]
    if config.strategy != "none":
        _apply(model, exact, means)
    decisions = {n: (config.strategy != "none", f"exact: {reasons[n]}") for n in exact}
    candidates = sorted((n for n in layers if reasons[n] is None), key=lambda n: (errors[n], n))
    if config.strategy == "all":
        _apply(model, candidates, means)
        decisions.update({n: (True, "strategy all") for n in candidates})
    elif config.strategy == "none":
        decisions.update({n: (False, "strategy none: report only") for n in candidates})
    else:
        decisions.update(_fold_within_budget(cal, candidates, errors, config))
    _, report.metric_after = evaluate(model, batches, labels, reference)
    if labels is None:
        report.metric_before = 100.0
    for name in layers:
        folded, why = decisions[name]
        s = stats.get(name, {})
        report.layers.append(LayerDecision(name, folded, why, float(s.get("spread", 0.0)), float(errors[name]),
                                           [round(float(v), 6) for v in means[name]]))
    return report


def _metric_name(batches: list, labels: Optional[list[int]]) -> str:
    """What the budget is measured in: accuracy with labels, else agreement with the unfolded model."""
    if labels is not None:
        return "accuracy"
    if batches and isinstance(batches[0], LMBatch):
        return batches[0].metric
    return "top-1 agreement"


def _mixing_vectors(layers: dict[str, LilyLinear], stats: dict) -> tuple[dict, dict]:
    """Per layer: the mixing vector a fold would freeze, and why it is exact (None: it is an approximation)."""
    means, reasons = {}, {}
    for name, layer in layers.items():
        why = static_by_design(layer)
        if why == "static mode":
            means[name] = layer.static_p.clone()
        elif why == "zero router (uniform mixing)" or name not in stats:
            means[name] = torch.full((layer.num_hp,), 1.0 / layer.num_hp)
        else:
            mean = torch.tensor(stats[name]["mean"], dtype=torch.float32)
            means[name] = mean / mean.sum()
        reasons[name] = why
    return means, reasons


@dataclass
class _Calibration:
    """The model being folded and what every fold is measured against (labels, or its own predictions)."""

    model: object
    batches: list[dict]
    labels: Optional[list[int]]
    reference: list[int]
    before: float
    means: dict[str, torch.Tensor]

    def drop(self) -> float:
        """How far the metric fell from before any fold: accuracy points, or 100 - top-1 agreement."""
        _, metric = evaluate(self.model, self.batches, self.labels, self.reference)
        return (100.0 - metric) if self.labels is None else (self.before - metric)


def _fold_within_budget(cal: _Calibration, candidates: list[str], errors: dict[str, float],
                        config: FoldConfig) -> dict[str, tuple[bool, str]]:
    """``auto``: fold the most candidates (least output error first) that keep the metric within budget."""
    decisions: dict[str, tuple[bool, str]] = {}
    budget = config.max_metric_drop + 1e-9
    eligible = []
    for name in candidates:
        if config.max_output_error is not None and errors[name] > config.max_output_error:
            decisions[name] = (False, f"output error {errors[name]:.2e} > {config.max_output_error:g}")
        else:
            eligible.append(name)
    # one evaluation settles the common case where every eligible layer fits the budget
    undo = _apply(cal.model, eligible, cal.means)
    drop = cal.drop()
    if drop <= budget:
        decisions.update({n: (True, f"metric drop {max(drop, 0.0):.2f} within budget (all eligible)")
                          for n in eligible})
        eligible = []
    else:
        _undo(cal.model, undo)
    # otherwise add layers one at a time, least output error first, keeping those that fit
    bar = tqdm(eligible, desc="fold (auto)", unit="layer", disable=not config.progress, leave=False)
    for name in bar:
        undo = _apply(cal.model, [name], cal.means)
        drop = cal.drop()
        if drop <= budget:
            decisions[name] = (True, f"metric drop {max(drop, 0.0):.2f} within budget")
        else:
            _undo(cal.model, undo)
            decisions[name] = (False, f"metric would drop {drop:.2f} > {config.max_metric_drop}")
    bar.close()
    return decisions


def calibration_batches(model, config: FoldConfig, seed: int = 0):
    """Batches and label ids from the calibration file (or random inputs, when asked).

    A causal LM's batches are :class:`LMBatch` es (no labels: the metric is agreement with the
    unfolded model), from prompt/response JSONL or from random tokens scored at every position.
    """
    decoder = model.task == "causal-lm"
    if config.calib is None:
        batches = _random_batches(model, config.size, config.batch_size, seed)
        if decoder:
            batches = [LMBatch(b, None, torch.ones_like(b["input_ids"], dtype=torch.bool), "next-token agreement")
                       for b in batches]
        return batches, None
    if decoder:
        return _lm_batches(model, config, seed), None
    return _table_batches(model, config, seed)


def _table_batches(model, config: FoldConfig, seed: int):
    """A labelled text table or image folder: encoded batches and (when the model knows them) label ids."""
    from .calib.readers import select

    from .core.data import encode_batch, model_label_map, read_data

    data = read_data(config.calib, text_column=config.text_column, label_column=config.label_column)
    items = data.files if hasattr(data, "files") else data.texts
    idx = select(items, config.size, seed)
    chosen = [items[i] for i in idx]
    labels = None
    if data.labels is not None and model.labels:
        labels = model_label_map(model.labels).encode([data.labels[i] for i in idx], where=str(config.calib))
    batches = [encode_batch(model, chosen[s:s + config.batch_size], config.max_length)
               for s in range(0, len(chosen), config.batch_size)]
    return batches, labels


def _lm_batches(model, config: FoldConfig, seed: int) -> list[LMBatch]:
    """Rows of a causal-LM JSONL file (``core.data.read_prompt_table``), tokenized as training does."""
    from .calib.readers import select

    from .core.data import lm_pad_id, read_prompt_table

    if model.tokenizer is None:
        raise LilyDeployError(f"{config.source}: its base model has no tokenizer; calibration text cannot be encoded")
    table = read_prompt_table(config.calib)
    table = table.select(select(table.lines, config.size, seed))
    vocab = int(model.model.config.vocab_size)
    rows = [_lm_row(model.tokenizer, table, i, config.max_length, vocab) for i in range(len(table))]
    pad = lm_pad_id(model.tokenizer)
    return [_lm_batch(model, rows[s:s + config.batch_size], 0 if pad is None else pad)
            for s in range(0, len(rows), config.batch_size)]


def _lm_row(tokenizer, table, i: int, max_length: int, vocab: int) -> tuple[list[int], list[int], int]:
    """``(ids, labels, prompt length)`` of row ``i``; a row with nothing to score is one line naming it.

    A prompt without a response is scored on the token generation would pick first (its label
    is the EOS ``lm_example`` appends); a plain text routes as one whole prompt and is scored at
    every next token.
    """
    from .core.data import IGNORE_INDEX, lm_example

    prompt, response, text, line = table.prompts[i], table.responses[i], table.texts[i], table.lines[i]
    ids, labels = lm_example(tokenizer, prompt, (response or "") if prompt is not None else text, max_length)
    where = f"{table.path}: line {line}"
    if prompt is not None and labels[:1] != [IGNORE_INDEX]:
        raise LilyDeployError(f"{where}: the prompt tokenizes to no tokens")
    if not any(label != IGNORE_INDEX for label in labels[1:]):
        raise LilyDeployError(f"{where}: no response token within max_length {max_length} (the prompt takes "
                              f"{labels.count(IGNORE_INDEX)}); raise max_length")
    if max(ids) >= vocab:
        raise LilyDeployError(f"{where}: the tokenizer gives token id {max(ids)}, past the model's vocabulary "
                              f"of {vocab}")
    return ids, labels, labels.count(IGNORE_INDEX) if prompt is not None else len(ids)


def _lm_batch(model, rows: list, pad_id: int) -> LMBatch:
    """Right-padded rows; scored: the positions whose next token is a labelled (response) token."""
    from .core.data import IGNORE_INDEX, lm_batch

    enc = lm_batch([(ids, labels) for ids, labels, _ in rows], pad_id)
    labels = enc.pop("labels")
    prompt = torch.zeros_like(labels, dtype=torch.bool)
    for row, (_, _, length) in enumerate(rows):
        prompt[row, :length] = True
    scored = torch.zeros_like(prompt)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return LMBatch({k: v for k, v in enc.items() if k in model.input_names}, prompt, scored)


def _random_batches(model, size: int, batch_size: int, seed: int) -> list[dict]:
    """Seeded random token ids (or pixels): calibration without data, measured as top-1 agreement."""
    from .onnx_export import example_inputs

    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, size, batch_size):
        n = min(batch_size, size - start)
        if model.task == "image-cls":
            batches.append(example_inputs(model, batch_size=n, seed=seed + start))
        else:
            vocab = int(getattr(model.model.config, "vocab_size", 1000))
            ids = torch.randint(5, vocab, (n, 32), generator=g)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def fold(config: Optional[FoldConfig] = None, /, **fields) -> FoldReport:
    """Fold ``source`` (adapter folder or deploy checkpoint) and write a deploy checkpoint to ``output``.

    The fields are :class:`FoldConfig`'s; ``output`` also gets ``fold_report.json``. A routing
    the model cannot fold under raises :class:`ConfigError` naming ``routing`` before the
    calibration data is read or anything is written.
    """
    from .core.deploy import load_model, save_deploy
    from .core.fileio import check_not_input, check_output_parent, write_json

    config = FoldConfig.resolve(config, **fields)
    output = check_output_parent(config.output, "-o")
    check_not_input(output, {"model": config.source, "base model": config.base, "calibration data": config.calib},
                    "-o")
    model = load_model(config.source, base=config.base)
    config = resolve_for(model, config)
    batches, labels = calibration_batches(model, config)
    report = fold_model(model, batches, labels, config)
    summary = {"strategy": config.strategy, "routing": report.routing, "folded": report.folded,
               "metric": report.metric_name, "metric_before": report.metric_before,
               "metric_after": report.metric_after,
               "calibration": str(config.calib) if config.calib else "random inputs"}
    model.meta["fold"] = summary
    save_deploy(model, output, extra={"fold": summary})
    write_json(output / REPORT, report.to_json())
    return report
