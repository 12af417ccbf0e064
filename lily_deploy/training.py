"""Fine-tuning with Lily (or a LoRA baseline) on labelled text or images, in one process or DDP.

The adapter is PEFT's own (``LilyConfig`` + ``get_peft_model``; the head trains through
``modules_to_save``) and is saved with ``save_pretrained``, so PEFT, ``lily-deploy inspect`` and
``deploy.load_model`` all read the output folder. Beside it goes ``lily_deploy.json`` (base model,
task, labels in class-id order, routing, columns).

Routing:

* ``batch`` -- PEFT's forward untouched: one mixing vector per layer averaged over every token of
  the (local) batch, padding included. Under DDP each process mixes over ITS OWN local batch, so
  the result depends on the number of processes (the log says so).
* ``sample`` -- PEFT's Lily layers get the deploy semantics (one mixing vector per sample over its
  non-padding tokens, ``converters.hpmix.hp_mix_reference``); the attention mask reaches them through
  a forward pre-hook on the model. Batch-invariant, so DDP with any number of processes gives the
  result of one process with the same global batch (up to float rounding), and training matches
  what ``--routing sample`` deploys.

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
import types
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .core.errors import LilyDeployError

METHODS = ("lily", "lora")
ROUTINGS = ("batch", "sample")
CHECKPOINT = Path("checkpoints") / "last"
LOG_FILE = "train_log.jsonl"
HEAD_NAMES = ("classifier", "score", "head", "fc")
# settings that must not change between a run and its --resume
RESUME_KEYS = ("model", "method", "rank", "lp_stride", "num_hp", "scale", "targets", "routing", "batch_size",
               "grad_accum", "lr", "weight_decay", "warmup", "max_length", "seed", "train", "train_size",
               "text_column", "label_column", "lora_rank", "max_grad_norm")


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


def _subset(n: int, size: Optional[int], seed: int) -> list[int]:
    idx = list(range(n))
    if size is None or size >= n:
        return idx
    rng = random.Random(seed)
    rng.shuffle(idx)
    return sorted(idx[:size])


def load_data(train: str | Path, val: Optional[str | Path], text_column: Optional[str] = None,
              label_column: Optional[str] = None, train_size: Optional[int] = None,
              val_size: Optional[int] = None, seed: int = 0):
    """``(train, val, label_map, task)``; every way the data can be unusable is a one-line error."""
    from .core.data import ImageFolder, LabelMap, read_data

    def read(path, flag, size):
        try:
            table = read_data(path, text_column=text_column, label_column=label_column, require_labels=True)
        except LilyDeployError as exc:
            raise LilyDeployError(f"{flag}: {exc}") from None
        if isinstance(table, ImageFolder):
            items, labels, kind = table.files, table.labels, "image"
        else:
            items, labels, kind = table.texts, table.labels, "text"
        keep = _subset(len(items), size, seed)
        return [items[i] for i in keep], [labels[i] for i in keep], kind, table

    tr_items, tr_labels, kind, _ = read(train, "--train", train_size)
    if not tr_items:
        raise LilyDeployError(f"--train {train}: no examples")
    label_map = LabelMap.from_values(tr_labels)
    if len(label_map) < 2:
        raise LilyDeployError(
            f"--train {train}: every example has label {label_map.labels[0]!r}; classification needs at least 2 classes"
        )
    train_data = LabelledData(Path(train), tr_items, label_map.encode(tr_labels, f"--train {train}"), kind)
    val_data = None
    if val is not None:
        v_items, v_labels, v_kind, _ = read(val, "--val", val_size)
        if v_kind != kind:
            raise LilyDeployError(f"--val {val}: holds {v_kind} data but --train {train} holds {kind} data")
        for row, v in enumerate(v_labels, start=1):
            if str(v) not in label_map.index:
                raise LilyDeployError(
                    f"--val {val}: row {row} has label {v!r}, which is not in --train {train} "
                    f"(train labels: {', '.join(label_map.labels)})"
                )
        val_data = LabelledData(Path(val), v_items, label_map.encode(v_labels, f"--val {val}"), kind)
    return train_data, val_data, label_map, ("image-cls" if kind == "image" else "seq-cls")


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


def _in_head(name: str, head: str) -> bool:
    return re.match(rf"(^|.*\.){re.escape(head)}($|\..*)", name) is not None


def linear_modules(model, head: str) -> dict[str, Any]:
    from torch import nn

    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _in_head(n, head)}


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


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model, targets: Optional[Sequence[str]], head: str, model_name: str) -> tuple[list[str], list[str]]:
    """``(targets, adapted layer names)``; a target that matches no Linear is an error listing those that exist."""
    linears = linear_modules(model, head)
    if not targets:
        from peft.utils import TRANSFORMERS_MODELS_TO_LILY_TARGET_MODULES_MAPPING as defaults

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = defaults.get(model_type)
        if not targets:
            raise LilyDeployError(
                f"no default --targets for {model_name} ({model_type or type(model).__name__}); name them, e.g. "
                f"--targets query,value; its Linear modules are: {abbreviate(list(linears))}"
            )
    targets = [t.strip() for t in targets if t and t.strip()]
    for t in targets:
        if not any(_matches(n, t) for n in linears):
            raise LilyDeployError(
                f"--targets {t!r} matches no Linear module of {model_name} (the head {head!r} is trained in full "
                f"and cannot be a target); its Linear modules are: {abbreviate(list(linears))}"
            )
    adapted = [n for n in linears if any(_matches(n, t) for t in targets)]
    return list(targets), adapted


def lily_param_count(model, adapted: Sequence[str], targets: Sequence[str], rank: int, num_hp: int,
                     stride: int) -> int:
    """Trainable Lily parameters, counted the way PEFT shares them (without building the adapter).

    PEFT groups adapted layers by (last matching target in list order, weight shape): one HP pool
    ``num_hp*r x d_out`` per group, one LP ``r x d_in`` per ``stride`` consecutive layers of a group,
    one router ``num_hp x r`` per layer.
    """
    modules = dict(model.named_modules())
    groups: dict[tuple, list] = {}
    for name in adapted:
        m = modules[name]
        suffix = None
        for t in targets:
            if name.endswith(t):
                suffix = t
        groups.setdefault((suffix, tuple(m.weight.shape)), []).append(m)
    total = 0
    for (_, (d_out, d_in)), layers in groups.items():
        total += num_hp * rank * d_out + math.ceil(len(layers) / stride) * rank * d_in + len(layers) * rank * num_hp
    return total


def lora_rank_for(model, adapted: Sequence[str], budget: int) -> tuple[int, int]:
    """``(rank, params)`` of the LoRA on the same layers whose parameter count is closest to ``budget``."""
    modules = dict(model.named_modules())
    per_rank = sum(modules[n].in_features + modules[n].out_features for n in adapted)
    low = max(1, budget // per_rank)
    rank = min((low, low + 1), key=lambda r: (abs(r * per_rank - budget), r))
    return rank, rank * per_rank


# ---------------------------------------------------------------- sample routing on PEFT's layers
class MaskContext:
    """The attention mask of the forward pass in flight, for layers that cannot see it."""

    def __init__(self) -> None:
        self.mask = None


def _sample_forward(self, x, *args, **kwargs):
    """PEFT Lily ``Linear.forward`` with per-sample routing over non-padding tokens."""
    from .converters.hpmix import hp_mix_reference

    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or not self.active_adapters:
        return result
    for adapter in self.active_adapters:
        if adapter not in self.lily_A:
            continue
        lp = self.lily_A[adapter]
        h = lp(self._cast_input_dtype(x, lp.weight.dtype))
        logits = self.lily_router[adapter](h)
        mask = self._lily_mask_context.mask
        if mask is None or h.dim() != 3 or mask.dim() != 2 or tuple(mask.shape) != tuple(h.shape[:2]):
            mask = None
        delta = hp_mix_reference(h, logits, self.lily_B[adapter].weight, mask, "sample", self.scaling[adapter])
        result = result + delta.to(result.dtype)
    return result


def enable_sample_routing(peft_model) -> MaskContext:
    """Give every PEFT Lily layer of ``peft_model`` sample routing; the model's forward feeds it the mask.

    The layers stay PEFT's (saving, loading and parameter names are unchanged); only their
    ``forward`` is replaced on the instance.
    """
    from peft.tuners.lily.layer import Linear as PeftLilyLinear

    ctx = MaskContext()
    n = 0
    for module in peft_model.modules():
        if isinstance(module, PeftLilyLinear):
            module._lily_mask_context = ctx
            module.forward = types.MethodType(_sample_forward, module)
            n += 1
    if not n:
        raise LilyDeployError("--routing sample: the model has no Lily layers")

    def pre_hook(module, args, kwargs):
        ctx.mask = kwargs.get("attention_mask")

    def post_hook(module, args, kwargs, output):
        ctx.mask = None

    peft_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    peft_model.register_forward_hook(post_hook, with_kwargs=True, always_call=True)
    return ctx


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


def init_distributed(device: Optional[str]) -> Dist:
    """One process, or DDP when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LilyDeployError(f"--device {device}: CUDA is not available on this machine")
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


def _readable(path: Path) -> None:
    """safetensors writes 0600 files; outputs get the umask's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path] if path.is_file() else path.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


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
    head: str
    targets: list[str]
    adapted: list[str]
    lily_params: int  # Lily's adapter count at the given rank/num_hp/stride
    lora_rank: int  # the LoRA rank matched to it (or the one asked for)
    lora_params: int


def build_model(base, method: str = "lily", rank: int = 16, lp_stride: int = 2, num_hp: int = 4,
                scale: float = 1.0, targets: Optional[Sequence[str]] = None, lora_rank: Optional[int] = None,
                routing: str = "batch") -> BuiltModel:
    """Wrap a loaded :class:`~lily_deploy.models.BaseModel` in PEFT's Lily (or the matched LoRA), head trainable.

    Seed the global RNG first: the adapter's (and a new head's) initialisation draws from it.
    """
    from peft import get_peft_model

    head = head_name(base.model)
    targets, adapted = resolve_targets(base.model, targets, head, base.spec)
    lily_count = lily_param_count(base.model, adapted, targets, rank, num_hp, lp_stride)
    matched_rank, lora_count = lora_rank_for(base.model, adapted, lily_count)
    if lora_rank:
        matched_rank, lora_count = lora_rank, lora_rank * lora_rank_for(base.model, adapted, 0)[1]  # rank 1's count
    task_type = "SEQ_CLS" if base.task == "seq-cls" else None
    if method == "lily":
        from peft import LilyConfig

        config = LilyConfig(r=rank, stride_A=lp_stride, num_B=num_hp, scaling=scale, target_modules=targets,
                            modules_to_save=[head], task_type=task_type)
    else:
        from peft import LoraConfig

        config = LoraConfig(r=matched_rank, lora_alpha=2 * matched_rank, lora_dropout=0.0, target_modules=targets,
                            modules_to_save=[head], task_type=task_type)
    with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(base.model, config)
    if method == "lily" and routing == "sample":
        enable_sample_routing(peft_model)
    return BuiltModel(peft_model, head, list(targets), adapted, lily_count, matched_rank, lora_count)


# ---------------------------------------------------------------- the training run
def _echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _num(value, flag: str, minimum=None, integer=False):
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        raise LilyDeployError(f"{flag} {value}: must be a finite number")
    if minimum is not None and value < minimum:
        raise LilyDeployError(f"{flag} {value}: must be >= {minimum}")
    return int(value) if integer else value


def finetune(
    model: str,
    train: str | Path,
    val: Optional[str | Path],
    output: str | Path,
    *,
    method: str = "lily",
    rank: int = 16,
    lp_stride: int = 2,
    num_hp: int = 4,
    scale: float = 1.0,
    targets: Optional[Sequence[str]] = None,
    lora_rank: Optional[int] = None,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    warmup: float = 0.06,
    max_length: int = 128,
    seed: int = 0,
    eval_every: Optional[int] = None,
    save_every: int = 100,
    grad_accum: int = 1,
    max_grad_norm: Optional[float] = 1.0,
    routing: str = "batch",
    text_column: Optional[str] = None,
    label_column: Optional[str] = None,
    train_size: Optional[int] = None,
    val_size: Optional[int] = None,
    resume: bool = False,
    overwrite: bool = False,
    device: Optional[str] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    _stop_after_step: Optional[int] = None,
    _nan_at_step: Optional[int] = None,
) -> FinetuneResult:
    """Fine-tune ``model`` (a spec for :func:`lily_deploy.models.load_base`) on ``train``; keep the best adapter.

    ``method="lily"`` trains PEFT's Lily (``rank``, ``lp_stride`` layers per LP, ``num_hp`` HPs
    per pool, ``scale``) on ``targets``; ``method="lora"`` trains PEFT's LoRA on the same layers
    at the rank whose parameter count is closest to that Lily's (``lora_rank`` overrides), with
    ``lora_alpha = 2 * rank``. ``warmup`` < 1 is a fraction of the steps, >= 1 a number of steps.
    Training length: ``max_steps`` optimizer steps if given, else ``epochs`` (default 3).
    ``batch_size`` is the global batch of one forward pass (split across DDP ranks); an optimizer
    step takes ``grad_accum`` of them. With ``routing="batch"`` under DDP each rank mixes over its
    local slice only (PEFT semantics per process); ``"sample"`` is batch-invariant.

    ``_stop_after_step`` (raise KeyboardInterrupt after that step) and ``_nan_at_step`` (make that
    step's loss NaN) are test hooks for the resume and divergence paths.
    """
    args = dict(locals())
    from .core.fileio import check_output_parent

    # ---- arguments
    if method not in METHODS:
        raise LilyDeployError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if routing not in ROUTINGS:
        raise LilyDeployError(f"--routing {routing!r}: choose one of {', '.join(ROUTINGS)}")
    if method == "lora" and routing != "batch":
        raise LilyDeployError("--routing sample applies to Lily only; LoRA has no router (drop --routing)")
    for flag, value, minimum in (("--rank", rank, 1), ("--lp-stride", lp_stride, 1), ("--num-hp", num_hp, 1),
                                 ("--batch-size", batch_size, 1), ("--grad-accum", grad_accum, 1),
                                 ("--max-length", max_length, 1), ("--save-every", save_every, 1)):
        _num(value, flag, minimum, integer=True)
    _num(max_steps, "--max-steps", 1, integer=True)
    _num(eval_every, "--eval-every", 1, integer=True)
    _num(lora_rank, "--lora-rank", 1, integer=True)
    _num(epochs, "--epochs", 0)
    _num(lr, "--lr", 0.0)
    _num(warmup, "--warmup", 0.0)
    _num(weight_decay, "--weight-decay", 0.0)
    _num(scale, "--scale")
    if epochs is not None and epochs <= 0:
        raise LilyDeployError(f"--epochs {epochs}: must be > 0")
    out = check_output_parent(output, "-o")
    if out.exists() and not out.is_dir():
        raise LilyDeployError(f"-o {out}: exists and is not a folder")
    ckpt_path = out / CHECKPOINT
    if resume and not (ckpt_path / "state.json").is_file():
        raise LilyDeployError(f"--resume: {ckpt_path} does not exist (no earlier run to continue in -o {out})")
    if not resume and out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LilyDeployError(f"-o {out}: folder is not empty; pass --resume to continue the run in it "
                                  f"or --overwrite to start over")

    d = init_distributed(device)
    say = (log or _echo) if d.main else (lambda msg: None)
    try:
        return _run(args, d, say, out, ckpt_path)
    finally:
        if d.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _run(a: dict, d: Dist, say: Callable[[str], None], out: Path, ckpt_path: Path) -> FinetuneResult:
    """The training loop of :func:`finetune` (arguments already checked)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .core.data import encode_batch
    from .core.models import load_base

    method, routing, seed = a["method"], a["routing"], a["seed"]
    batch_size, grad_accum = a["batch_size"], a["grad_accum"]

    if d.main and a["overwrite"] and not a["resume"] and out.exists():
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    if d.active:
        import torch.distributed as dist

        dist.barrier()

    # ---- data and model (seeded first: the head's initialisation comes from the global RNG)
    train_data, val_data, label_map, task = load_data(
        a["train"], a["val"], a["text_column"], a["label_column"], a["train_size"], a["val_size"], seed)
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    base = load_base(a["model"], task=task, num_labels=len(label_map), labels=label_map.labels)
    if base.task != task:
        raise LilyDeployError(f"--model {a['model']}: a {base.task} model cannot learn {task} data")
    built = build_model(base, method=method, rank=a["rank"], lp_stride=a["lp_stride"], num_hp=a["num_hp"],
                        scale=a["scale"], targets=a["targets"], lora_rank=a["lora_rank"], routing=routing)
    peft_model, head, targets, adapted = built.peft_model, built.head, built.targets, built.adapted
    lily_count, lora_rank, lora_count, model_name = built.lily_params, built.lora_rank, built.lora_params, base.spec
    peft_model.to(d.device)
    params = _trainable(peft_model)
    trainable_n = sum(p.numel() for p in params.values())
    adapter_n = sum(p.numel() for n, p in params.items() if not _in_head(n, head))
    head_n = trainable_n - adapter_n
    say(f"finetune: {method} on {model_name} ({task}, {len(label_map)} labels, {len(adapted)} layers: "
        f"{abbreviate(adapted, 4)})")
    say(f"trainable parameters: Lily adapter {lily_count:,} (r {a['rank']}, {a['num_hp']} HPs, LP stride "
        f"{a['lp_stride']}) vs LoRA adapter {lora_count:,} (r {lora_rank}); this run: {method} {adapter_n:,} "
        f"+ head {head_n:,} = {trainable_n:,}")
    if d.active:
        if method == "lora":
            note = "LoRA has no router: same result as one process with the same global batch"
        elif routing == "batch":
            note = (f"each process mixes over its own local batch (about {batch_size // d.world} of the global "
                    f"{batch_size}), so results depend on the process count; use --routing sample for "
                    "batch-invariant training")
        else:
            note = "batch-invariant routing: same result as one process with the same global batch"
        say(f"DDP: {d.world} processes ({'nccl' if d.device.type == 'cuda' else 'gloo'}), routing {routing}: {note}")

    # ---- optimizer and schedule
    decay = [p for n, p in params.items() if p.dim() >= 2]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": a["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=a["lr"])
    micro_per_epoch = math.ceil(len(train_data) / batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / grad_accum)
    if a["max_steps"]:
        total = int(a["max_steps"])
    else:
        total = max(1, math.ceil((a["epochs"] if a["epochs"] is not None else 3) * steps_per_epoch))
    warmup_steps = int(round(a["warmup"] * total)) if a["warmup"] < 1 else int(a["warmup"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total))
    eval_every = a["eval_every"] or steps_per_epoch

    run_config = {k: (str(a[k]) if isinstance(a[k], Path) else a[k]) for k in RESUME_KEYS if k in a}
    run_config.update(model=str(a["model"]), targets=targets, lora_rank=lora_rank if method == "lora" else None,
                      train=str(Path(a["train"]).resolve()))
    sidecar = {
        "base_model": base.spec if (base.spec != str(a["model"]) or not Path(a["model"]).exists())
        else str(Path(a["model"]).resolve()),
        "task": task,
        "labels": label_map.labels,
        "routing": routing if method == "lily" else None,
        "method": method,
        "text_column": a["text_column"],
        "label_column": a["label_column"],
        "max_length": a["max_length"],
    }

    # ---- resume
    start, best_acc, best_step = 0, None, None
    history: list = []
    if a["resume"]:
        state, rng_states = load_checkpoint(ckpt_path, peft_model, optimizer, scheduler)
        saved = state["config"]
        diffs = [f"{k} {run_config.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in RESUME_KEYS
                 if saved.get(k) != run_config.get(k)]
        if diffs:
            raise LilyDeployError(f"--resume: settings differ from the checkpoint's run: {'; '.join(diffs)}")
        if state["total_steps"] != total:
            say(f"resume: the run now has {total} steps (was {state['total_steps']}); the LR schedule changes")
        start, best_acc, best_step = state["step"], state["best_val_accuracy"], state["best_step"]
        history = state.get("history", [])
        if len(rng_states) == d.world:
            _set_rng_state(rng_states[d.rank], d.device)
        else:
            say(f"resume: checkpoint was written by {len(rng_states)} processes, now {d.world}; dropout RNG reseeded")
            torch.manual_seed(seed + 1000 * start + d.rank)
        say(f"resume: from step {start} of {total} ({ckpt_path}); best val accuracy so far "
            f"{'-' if best_acc is None else f'{best_acc:.4f}'}")
    elif d.active:
        torch.manual_seed(seed + d.rank)  # distinct dropout per rank; weights were made before this
    if d.main:
        out.mkdir(exist_ok=True)
    if d.active:
        import torch.distributed as dist

        dist.barrier()
    log_path = out / LOG_FILE
    log_file = open(log_path, "a", encoding="utf-8") if d.main else None

    def write_log(record: dict) -> None:
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    if a["resume"]:
        write_log({"event": "resume", "step": start})
    else:
        write_log({"event": "start", "config": run_config, "world_size": d.world, "steps": total,
                   "trainable_params": trainable_n, "adapter_params": adapter_n, "lily_params": lily_count,
                   "lora_rank": lora_rank, "lora_params": lora_count})

    train_model = peft_model
    if d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(peft_model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    def to_device(batch: dict) -> dict:
        return {k: v.to(d.device) for k, v in batch.items()}

    def micro_batches(step: int) -> list[list[int]]:
        epoch, k = divmod(step, steps_per_epoch)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(train_data), generator=g).tolist()
        chunks = [order[i * batch_size:(i + 1) * batch_size] for i in range(k * grad_accum,
                                                                          min((k + 1) * grad_accum, micro_per_epoch))]
        return [c for c in chunks if len(c) >= d.world]

    def evaluate() -> dict:
        peft_model.eval()
        correct = loss = count = 0.0
        with torch.no_grad():
            for s in range(0, len(val_data), batch_size):
                idx = split_for_rank(range(s, min(s + batch_size, len(val_data))), d.rank, d.world)
                if not idx:
                    continue
                inputs = to_device(encode_batch(base, [val_data.items[i] for i in idx], a["max_length"]))
                labels = torch.tensor([val_data.labels[i] for i in idx], device=d.device)
                logits = peft_model(**inputs).logits.float()
                loss += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += (logits.argmax(-1) == labels).sum().item()
                count += len(idx)
        correct, loss, count = _all_reduce([correct, loss, count], d)
        peft_model.train()
        return {"val_accuracy": correct / max(count, 1), "val_loss": loss / max(count, 1), "val_size": int(count)}

    def checkpoint(step: int) -> None:
        for n, p in params.items():
            if not torch.isfinite(p).all():
                raise LilyDeployError(nan_message(step, f"parameter {n} is not finite"))
        rng = [_rng_state(d.device)]
        if d.active:
            import torch.distributed as dist

            rng = [None] * d.world
            dist.all_gather_object(rng, _rng_state(d.device))
        if d.main:
            state = {"step": step, "total_steps": total, "best_val_accuracy": best_acc, "best_step": best_step,
                     "config": run_config, "world_size": d.world, "history": history[-1000:]}
            save_checkpoint(ckpt_path, peft_model, optimizer, scheduler, state, rng)
        last_ckpt[0] = step
        if d.active:
            import torch.distributed as dist

            dist.barrier()

    last_ckpt = [start if a["resume"] else None]

    def nan_message(step: int, what: str) -> str:
        kept = (f"the last good checkpoint (step {last_ckpt[0]}) is kept in {ckpt_path}"
                if last_ckpt[0] is not None else "no checkpoint had been written yet")
        best = f" and the best adapter (step {best_step}) in {out}" if best_step is not None else ""
        return (f"training diverged at step {step + 1}: {what}. Stopped; {kept}{best}. "
                f"Lower --lr (now {a['lr']:g}) or raise --warmup")

    # ---- the loop
    peft_model.train()
    samples_done, train_time, last_loss = 0, 0.0, None
    recent: list[float] = []
    bar = tqdm(total=total, initial=start, disable=not (a["progress"] and d.main), file=sys.stderr,
               unit="step", dynamic_ncols=True, desc=f"{method} {routing}" if method == "lily" else method)
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            chunks = micro_batches(step)
            n_step = sum(len(c) for c in chunks)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for i, chunk in enumerate(chunks):
                local = split_for_rank(chunk, d.rank, d.world)
                inputs = to_device(encode_batch(base, [train_data.items[j] for j in local], a["max_length"]))
                labels = torch.tensor([train_data.labels[j] for j in local], device=d.device)
                sync = contextlib.nullcontext()
                if d.active and i < len(chunks) - 1:
                    sync = train_model.no_sync()
                with sync:
                    logits = train_model(**inputs).logits.float()
                    losses = F.cross_entropy(logits, labels, reduction="none")
                    if a["_nan_at_step"] is not None and step + 1 == a["_nan_at_step"]:
                        losses = losses * float("nan")  # test hook: a diverged step
                    (losses.sum() * (d.world / n_step)).backward()
                loss_sum += losses.detach().sum().double().cpu()
            total_loss, = _all_reduce([loss_sum.item()], d)
            step_loss = total_loss / n_step
            if not math.isfinite(step_loss):
                raise LilyDeployError(nan_message(step, f"the loss is {step_loss}"))
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), a["max_grad_norm"] or float("inf"))
            if not torch.isfinite(grad_norm):
                raise LilyDeployError(nan_message(step, f"the gradient norm is {grad_norm.item()}"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            train_time += dt
            samples_done += n_step
            last_loss = step_loss
            recent = (recent + [step_loss])[-20:]
            done = step + 1
            sps = samples_done / max(train_time, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", samples_s=f"{sps:.1f}")
            write_log({"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": round(step_loss, 6),
                       "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 6),
                       "samples_per_s": round(sps, 2)})
            evaluated = False
            if val_data is not None and (done % eval_every == 0 or done == total):
                metrics = evaluate()
                improved = best_acc is None or metrics["val_accuracy"] > best_acc
                if improved:
                    best_acc, best_step = metrics["val_accuracy"], done
                    if d.main:
                        save_adapter(out, peft_model, {**sidecar, "best": {"step": done, **metrics}})
                record = {"step": done, "train_loss": round(step_loss, 6), **metrics, "best": improved}
                history.append(record)
                write_log({"event": "eval", **record})
                line = (f"step {done}/{total}: val accuracy {metrics['val_accuracy']:.4f}, val loss "
                        f"{metrics['val_loss']:.4f}{' (best)' if improved else ''}")
                if d.main and a["progress"]:
                    bar.write(line, file=sys.stderr)
                else:
                    say(line)
                evaluated = True
            if val_data is None and done == total and d.main:
                save_adapter(out, peft_model, sidecar)
            if evaluated or done % a["save_every"] == 0 or done == total:
                checkpoint(done)
            if a["_stop_after_step"] is not None and done >= a["_stop_after_step"]:
                raise KeyboardInterrupt(f"stopped after step {done} (test hook)")
    except KeyboardInterrupt:
        kept = f"checkpoint at step {last_ckpt[0]} in {ckpt_path}" if last_ckpt[0] is not None else "no checkpoint yet"
        say(f"interrupted during step {step + 1}: {kept}; continue with --resume")
        raise
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    steps = total
    write_done = {"event": "done", "steps": steps, "best_val_accuracy": best_acc, "best_step": best_step,
                  "samples_per_s": round(samples_done / max(train_time, 1e-9), 2)}
    if d.main:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(write_done) + "\n")
        say(f"done: {steps} steps; best val accuracy "
            f"{'-' if best_acc is None else f'{best_acc:.4f}'} at step {best_step}; adapter in {out}")
    return FinetuneResult(
        output_dir=out, best_val_accuracy=best_acc, best_step=best_step, steps=steps, trainable_params=trainable_n,
        adapter_params=adapter_n, head_params=head_n, method=method, lily_params=lily_count,
        lora_rank=lora_rank if method == "lora" else None,
        samples_per_s=samples_done / max(train_time, 1e-9), train_seconds=train_time, world_size=d.world,
        final_loss=last_loss, history=history,
    )
