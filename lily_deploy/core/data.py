"""Labelled data: text tables (TSV/CSV/JSONL) and image folder trees, read the same way by
``finetune``, ``inspect``, ``fold``, ``calib`` and ``parity``.

Text columns are found by name (``text`` or ``sentence``) unless a flag names them; labels
may be strings or integers and map to class ids through a :class:`LabelMap` saved with the
adapter. Problems name the file, and the row or column at fault.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .errors import LilyDeployError

TEXT_COLUMNS = ("text", "sentence", "sentence1", "content", "review")
LABEL_COLUMNS = ("label", "labels", "class", "target")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class TextTable:
    """Texts and (optional) string labels read from one file."""

    path: Path
    texts: list[str]
    labels: Optional[list[str]]
    text_column: str
    label_column: Optional[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class ImageFolder:
    """Image paths and labels from ``root/<label>/<image>``."""

    path: Path
    files: list[Path]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.files)


class LabelMap:
    """Label string <-> class id; integer-looking labels keep their numeric order."""

    def __init__(self, labels: Sequence[str]):
        self.labels = [str(l) for l in labels]
        self.index = {l: i for i, l in enumerate(self.labels)}

    @classmethod
    def from_values(cls, values: Sequence[str]) -> "LabelMap":
        uniq = set(map(str, values))
        if all(_is_int(v) for v in uniq):
            return cls(sorted(uniq, key=int))
        return cls(sorted(uniq))

    def encode(self, values: Sequence[str], where: str = "data") -> list[int]:
        ids = []
        for row, v in enumerate(values, start=1):
            if str(v) not in self.index:
                raise LilyDeployError(
                    f"{where}: row {row} has label {v!r}, which the model does not know (labels: {', '.join(self.labels)})"
                )
            ids.append(self.index[str(v)])
        return ids

    def __len__(self) -> int:
        return len(self.labels)


def model_label_map(labels: Optional[Sequence[str]], num_labels: Optional[int] = None) -> Optional[LabelMap]:
    """The label map of a model; Hugging Face's placeholder names LABEL_i mean integer labels i."""
    if not labels:
        return LabelMap([str(i) for i in range(num_labels)]) if num_labels else None
    if all(str(l) == f"LABEL_{i}" for i, l in enumerate(labels)):
        return LabelMap([str(i) for i in range(len(labels))])
    return LabelMap(labels)


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


def _pick(columns: Sequence[str], wanted: Optional[str], candidates: Sequence[str], path: Path, what: str,
          flag: str) -> Optional[str]:
    if wanted is not None:
        if wanted not in columns:
            raise LilyDeployError(f"{path}: no column {wanted!r} ({flag}); columns are {', '.join(columns)}")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    return None


def read_text_table(path: str | Path, text_column: Optional[str] = None, label_column: Optional[str] = None,
                    require_labels: bool = False, limit: Optional[int] = None) -> TextTable:
    """Read a TSV, CSV or JSONL file of texts and labels."""
    path = Path(path)
    if not path.is_file():
        raise LilyDeployError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    rows: list[dict]
    try:
        if suffix in (".jsonl", ".json"):
            rows = [row for _, row in read_jsonl_objects(path, limit, example='{"text": ..., "label": ...}')]
            columns = list(rows[0].keys()) if rows else []
        elif suffix in (".tsv", ".csv", ".txt"):
            delimiter = "," if suffix == ".csv" else "\t"
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE)
                rows = []
                try:
                    columns = list(reader.fieldnames or [])
                    for row in reader:
                        rows.append(row)
                        if limit and len(rows) >= limit:
                            break
                except csv.Error as exc:  # e.g. a field over the csv module's size limit
                    raise LilyDeployError(f"{path}: line {reader.reader.line_num}: {exc}") from None
        else:
            raise LilyDeployError(f"{path}: unsupported data format {suffix or '(none)'}; use .tsv, .csv or .jsonl")
    except UnicodeDecodeError:
        raise LilyDeployError(f"{path}: not UTF-8 text") from None
    if not rows:
        raise LilyDeployError(f"{path}: no data rows")
    tcol = _pick(columns, text_column, TEXT_COLUMNS, path, "text", "--text-column")
    if tcol is None:
        raise LilyDeployError(f"{path}: no text column (looked for {', '.join(TEXT_COLUMNS)}); name it with --text-column")
    lcol = _pick(columns, label_column, LABEL_COLUMNS, path, "label", "--label-column")
    if lcol is None and require_labels:
        raise LilyDeployError(f"{path}: no label column (looked for {', '.join(LABEL_COLUMNS)}); name it with --label-column")
    texts, labels = [], []
    for i, row in enumerate(rows, start=2 if suffix != ".jsonl" else 1):
        text = row.get(tcol)
        if text is None:
            raise LilyDeployError(f"{path}: row {i} has no {tcol!r}")
        texts.append(str(text).strip())
        if lcol is not None:
            label = row.get(lcol)
            if label is None or str(label).strip() == "":
                raise LilyDeployError(f"{path}: row {i} has an empty label")
            if isinstance(label, float) and math.isnan(label):
                raise LilyDeployError(f"{path}: row {i} has a NaN label")
            labels.append(str(label).strip())
    return TextTable(path, texts, labels if lcol else None, tcol, lcol)


def read_image_folder(path: str | Path) -> ImageFolder:
    """``root/<label>/<image>`` trees (the torchvision ImageFolder layout)."""
    path = Path(path)
    if not path.is_dir():
        raise LilyDeployError(f"image folder {path} does not exist")
    files, labels = [], []
    for cls_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        for f in sorted(cls_dir.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(cls_dir.name)
    if not files:
        raise LilyDeployError(f"{path}: no images in <label>/<image> sub-folders")
    return ImageFolder(path, files, labels)


def read_data(path: str | Path, text_column: Optional[str] = None, label_column: Optional[str] = None,
              require_labels: bool = False, limit: Optional[int] = None):
    """A text table for a file, an image folder for a folder."""
    if Path(path).is_dir():
        return read_image_folder(path)
    return read_text_table(path, text_column, label_column, require_labels, limit)


def load_images(files: Sequence[Path], size: int):
    """Images as a float tensor ``[N, 3, size, size]`` normalised to [-1, 1] (ViT convention)."""
    import numpy as np
    import torch

    try:
        from PIL import Image
    except ImportError:
        raise LilyDeployError("image data needs Pillow: pip install pillow") from None
    arrays = []
    for f in files:
        try:
            img = Image.open(f).convert("RGB").resize((size, size))
        except OSError as exc:
            raise LilyDeployError(f"{f}: cannot read image ({exc})") from None
        arrays.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def encode_batch(model, items: Sequence, max_length: int = 128) -> dict:
    """Model inputs for a batch of texts (tokenised, padded to the longest) or image files."""
    if model.task == "image-cls":
        return {"pixel_values": load_images(items, model.image_size or 224)}
    if model.tokenizer is None:
        raise LilyDeployError("the model has no tokenizer; text data cannot be encoded")
    enc = model.tokenizer(list(items), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in model.input_names}


# ---------------------------------------------------------------- causal-LM data: prompts and responses
PROMPT_FIELD, RESPONSE_FIELD, TEXT_FIELD = "prompt", "response", "text"
IGNORE_INDEX = -100  # the label of a token the loss skips (prompt, padding): PyTorch's and transformers' value


@dataclass
class PromptTable:
    """Rows of a causal-LM JSONL file, each a ``prompt`` with its ``response`` (None where the file has none)
    or a plain ``text`` (prompt and response None); ``lines`` are the file's line numbers, for messages."""

    path: Path
    prompts: list[Optional[str]]
    responses: list[Optional[str]]
    texts: list[Optional[str]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.lines)

    def select(self, rows: Sequence[int]) -> "PromptTable":
        """The rows ``rows`` (in that order), keeping their line numbers."""
        prompts, responses, texts, lines = ([values[i] for i in rows]
                                            for values in (self.prompts, self.responses, self.texts, self.lines))
        return PromptTable(self.path, prompts, responses, texts, lines)


def read_jsonl_objects(path: str | Path, limit: Optional[int] = None,
                       example: str = '{"prompt": ..., "response": ...}') -> list[tuple[int, dict]]:
    """``(line number, object)`` per non-blank line; a line that is not a JSON object is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise LilyDeployError(f"data file {path} does not exist")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LilyDeployError(f"{path}: line {i} is not JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise LilyDeployError(f"{path}: line {i} is a JSON {type(row).__name__}, expected an object "
                                          f"like {example}")
                rows.append((i, row))
                if limit and len(rows) >= limit:
                    break
    except UnicodeDecodeError:
        raise LilyDeployError(f"{path}: not UTF-8 text") from None
    return rows


def _string_field(row: dict, name: str, where: str, allow_empty: bool) -> Optional[str]:
    """``row[name]`` when it is a string (non-empty unless ``allow_empty``); None when absent or null."""
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise LilyDeployError(f"{where}: {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise LilyDeployError(f"{where}: {name!r} is empty")
    return value


def read_prompt_table(path: str | Path, require_response: bool = False, limit: Optional[int] = None) -> PromptTable:
    """Read a JSONL file of ``{"prompt", "response"}`` or ``{"text"}`` objects (causal-LM data).

    The strings are kept as written (a response's leading space is part of it). A line with
    neither field, with both a prompt and a text, or (``require_response``: training and
    validation data) a prompt with no response, is one line naming the file and line.
    """
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise LilyDeployError(f"{path}: causal-LM data is JSONL (.jsonl), one object a line with "
                              f"{PROMPT_FIELD!r} and {RESPONSE_FIELD!r} fields or a {TEXT_FIELD!r} field")
    prompts, responses, texts, lines = [], [], [], []
    for i, row in read_jsonl_objects(path, limit):
        where = f"{path}: line {i}"
        prompt = _string_field(row, PROMPT_FIELD, where, allow_empty=False)
        response = _string_field(row, RESPONSE_FIELD, where, allow_empty=True)
        text = _string_field(row, TEXT_FIELD, where, allow_empty=False)
        if prompt is None and text is None:
            raise LilyDeployError(f"{where} has neither {PROMPT_FIELD!r} (with {RESPONSE_FIELD!r}) nor {TEXT_FIELD!r}"
                                  f" (keys: {', '.join(map(str, row)) or 'none'})")
        if prompt is not None and text is not None:
            raise LilyDeployError(f"{where} has both {PROMPT_FIELD!r} and {TEXT_FIELD!r}; give a prompt with its "
                                  "response, or a text")
        if text is not None and response is not None:
            raise LilyDeployError(f"{where} has a {RESPONSE_FIELD!r} but no {PROMPT_FIELD!r}")
        if prompt is not None and response is None and require_response:
            raise LilyDeployError(f"{where} has a {PROMPT_FIELD!r} but no {RESPONSE_FIELD!r} to learn")
        prompts.append(prompt)
        responses.append(response)
        texts.append(text)
        lines.append(i)
    if not lines:
        raise LilyDeployError(f"{path}: no data rows")
    return PromptTable(path, prompts, responses, texts, lines)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids as training feeds them: with the tokenizer's own special tokens (e.g. BOS)."""
    return list(tokenizer(prompt)["input_ids"])


def lm_example(tokenizer, prompt: Optional[str], response: str, max_length: int) -> tuple[list[int], list[int]]:
    """``(input ids, labels)`` of one row: prompt + response + EOS, cut to ``max_length`` tokens.

    The prompt's labels are :data:`IGNORE_INDEX` (the loss is on the response); with ``prompt``
    None, ``response`` is a plain text, tokenized with the special tokens, every token labelled.
    Prompt and response are tokenized apart so the prompt's ids are those generation starts from.
    """
    if prompt is None:
        head, tail = [], list(tokenizer(response)["input_ids"])
    else:
        head, tail = prompt_ids(tokenizer, prompt), list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not tail or tail[-1] != eos):
        tail.append(eos)
    ids = (head + tail)[:max_length]
    labels = ([IGNORE_INDEX] * len(head) + tail)[:max_length]
    return ids, labels


def lm_pad_id(tokenizer) -> Optional[int]:
    """The id padding uses: the tokenizer's pad token, else its EOS (masked out either way); None if neither."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def lm_batch(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (:data:`IGNORE_INDEX` at padding) tensors."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (tokens, targets) in enumerate(examples):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, :len(tokens)] = 1
        labels[row, :len(targets)] = torch.tensor(targets, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- model inputs given as arrays
def read_npz_inputs(path: str | Path, names: Sequence[str], where: str = "--data") -> dict:
    """Model inputs from an ``.npz`` holding one array per input name (axis 0: sample), as torch tensors.

    ``token_type_ids`` may be absent (zeros are the model's default); every other input must be
    there, with the same number of samples, and finite when floating point.
    """
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise LilyDeployError(f"{where} {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zipfile, ValueError, OSError: not a usable .npz
        raise LilyDeployError(f"{where} {path}: not a readable .npz ({str(exc).splitlines()[0][:200]})") from None
    missing = [n for n in names if n not in arrays and n != "token_type_ids"]
    if missing:
        raise LilyDeployError(f"{where} {path}: no array for model input {missing[0]} (has {', '.join(arrays) or 'none'})")
    out = {n: arrays[n] for n in names if n in arrays}
    counts = {n: (a.shape[0] if a.ndim else 0) for n, a in out.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise LilyDeployError(f"{where} {path}: inputs hold different or no sample counts ({counts})")
    for n, a in out.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise LilyDeployError(f"{where} {path}: {n} holds NaN or infinite values")
        if a.dtype.kind not in "fiub":
            raise LilyDeployError(f"{where} {path}: {n} has dtype {a.dtype}, expected numbers")
    return {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in out.items()}
