"""``export -o DIR/``: a deploy folder that Hugging Face tools load with no lily-deploy installed.

The folder holds ``model.onnx`` (the validated export, ``lily::HPMix`` function bodies and all,
so any onnxruntime runs it), the model's ``config.json`` with its label map and task class, and
the tokenizer's files: the layout Optimum's ``ORTModelForSequenceClassification.from_pretrained``
reads, so ``transformers.pipeline("text-classification", model=ORTModel..., tokenizer=...)`` works.
The folder is written as a whole (staged beside it, swapped in on success), never half.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .core.errors import LilyDeployError
from .core.fileio import atomic_dir, check_not_input

MODEL_FILE = "model.onnx"
# the task classes whose ONNX inputs/outputs Optimum's ORTModelFor* feed and read as we write them
ARCHITECTURE_SUFFIX = {"seq-cls": "ForSequenceClassification", "image-cls": "ForImageClassification"}


def is_folder_output(output) -> bool:
    """``-o DIR/`` (a trailing separator) or ``-o DIR`` naming an existing folder."""
    text = str(output)
    return text.endswith((os.sep, "/")) or Path(text).is_dir()


def export_folder(config):
    """Export into ``config.output`` as a folder (see the module doc); returns the :class:`ExportResult`."""
    from .core.deploy import open_model
    from .onnx_export import export_onnx

    folder = Path(str(config.output).rstrip("/" + os.sep))
    check_not_input(folder, {"model": config.source, "base model": config.base, "validation data": config.data,
                             "validation inputs": config.inputs_npz}, "-o")
    deploy = open_model(config.source, base=config.base)
    if deploy.task not in ARCHITECTURE_SUFFIX:
        raise LilyDeployError(f"-o {config.output}: a folder is written for classifiers; a {deploy.task} graph "
                              "carries a KV cache and routing state no Hugging Face loader feeds: give -o FILE.onnx")
    with atomic_dir(folder) as tmp:
        result = export_onnx(dataclasses.replace(config, output=str(tmp / MODEL_FILE)))
        if not result.passed and not config.keep_on_failure:
            raise LilyDeployError(f"validation failed: onnxruntime differs from torch beyond tolerance; "
                                  f"{folder} not written")
        write_model_files(deploy, tmp)
    result.path = folder / MODEL_FILE
    return result


def write_model_files(deploy, folder: Path) -> list[str]:
    """``config.json`` (label map, task class) and the tokenizer or image processor beside the graph."""
    config = deploy.model.config
    labels = deploy.labels or [str(i) for i in range(int(getattr(config, "num_labels", 2)))]
    config.id2label = {i: str(name) for i, name in enumerate(labels)}
    config.label2id = {str(name): i for i, name in enumerate(labels)}
    prefix = type(deploy.model).__name__
    for suffix in ARCHITECTURE_SUFFIX.values():
        prefix = prefix.replace(suffix, "")
    config.architectures = [prefix + ARCHITECTURE_SUFFIX[deploy.task]]
    config.save_pretrained(str(folder))
    written = ["config.json"]
    if deploy.tokenizer is not None:
        written += [Path(p).name for p in deploy.tokenizer.save_pretrained(str(folder))]
    return written
