"""Calibration readers: a data file becomes real model inputs, in batches.

The same reader feeds router statistics (``fold``, ``inspect --data``) as torch tensors and
INT8 calibration and validation (``quantize``) as numpy through onnxruntime's
``CalibrationDataReader``. Data files are those ``finetune`` reads (TSV/CSV/JSONL text, image
folders) plus ``.npz`` files holding one array per model input (axis 0 = sample).

Text is tokenised with the source model's tokenizer, found explicitly (``--tokenizer`` /
``--model``) or from the ONNX metadata (``lily_deploy.base_model``). Tokenised batches are
cached as an ``.npz`` keyed by a hash of the data file's content, the model's input signature,
the tokenizer and every setting, so a repeated run skips tokenisation; the file carries a
checksum of its tensors, and one that fails it (or cannot be read) is rebuilt with a warning,
never used. Problems name the file and the row at fault.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ..core.data import encode_batch, read_data
from ..core.errors import LilyDeployError

CACHE_FORMAT = "lily-deploy-calib/2"  # 2: a checksum of the cached tensors
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_INPUT = "pixel_values"
LABEL_KEY = "labels"  # optional array of labels in an .npz


class CalibrationWarning(UserWarning):
    """Calibration went ahead with less than was asked (e.g. fewer samples)."""


def select(items: Sequence, size: Optional[int], seed: int = 0) -> list[int]:
    """Indices of ``size`` items, shuffled by ``seed`` (all of them, in order, when size is None)."""
    idx = list(range(len(items)))
    if size is None or size >= len(idx):
        return idx
    rng = random.Random(seed)
    rng.shuffle(idx)
    return sorted(idx[:size])


def torch_batches(model, data_path, batch_size: int = 16, size: Optional[int] = None, seed: int = 0,
                  max_length: int = 128, text_column: Optional[str] = None) -> Iterator[dict]:
    """Model inputs (torch tensors) for up to ``size`` rows of a data file."""
    data = read_data(data_path, text_column=text_column)
    items = data.files if hasattr(data, "files") else data.texts
    chosen = [items[i] for i in select(items, size, seed)]
    for start in range(0, len(chosen), batch_size):
        yield encode_batch(model, chosen[start:start + batch_size], max_length=max_length)


# ---------------------------------------------------------------------------------------
# what the ONNX model takes
# ---------------------------------------------------------------------------------------

@dataclass
class InputSpec:
    """One graph input: name, numpy dtype, shape (ints for fixed axes, None/str for dynamic ones)."""

    name: str
    dtype: Any
    shape: list

    def fixed(self, axis: int) -> Optional[int]:
        d = self.shape[axis]
        return d if isinstance(d, int) and d > 0 else None


def onnx_input_specs(model) -> list[InputSpec]:
    """The real inputs of an ONNX ``ModelProto`` (initializers listed as inputs are not inputs)."""
    import onnx

    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


# ---------------------------------------------------------------------------------------
# tokenizer: explicit, or from the model folder, or from the ONNX metadata
# ---------------------------------------------------------------------------------------

@dataclass
class Tokenizer:
    """A loaded tokenizer and a content hash of its files (part of the cache key)."""

    tokenizer: Any
    source: str  # what it came from, for messages
    identity: str


def _has_tokenizer_files(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES)


def _load_tokenizer(folder: Path, source: str) -> Tokenizer:
    import transformers

    from ..core.models import quiet_transformers

    quiet_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for a broken folder
        raise LilyDeployError(f"{source}: cannot load a tokenizer from {folder} ({str(exc).splitlines()[0][:200]})") from None
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = folder / name
        if f.is_file():
            h.update(name.encode())
            h.update(hashlib.sha256(f.read_bytes()).hexdigest().encode())
    return Tokenizer(tok, source, h.hexdigest()[:16])


def _base_folder(spec: str, where: str) -> Path:
    from ..core.models import resolve_base

    try:
        kind, folder = resolve_base(spec)
    except LilyDeployError as exc:
        raise LilyDeployError(f"{where}: {exc}; give the tokenizer with --tokenizer DIR or --model DIR") from None
    if folder is None:
        raise LilyDeployError(f"{where}: base model {spec} has no tokenizer (it is not a text model)")
    return Path(folder)


def resolve_tokenizer(tokenizer: Optional[str] = None, model: Optional[str] = None,
                      base_model: Optional[str] = None, onnx_path: Optional[str] = None) -> Tokenizer:
    """The tokenizer of the source model, looked for in this order:

    ``tokenizer`` (a folder with tokenizer files, or ``minilm``); ``model`` (the adapter folder,
    deploy checkpoint or Hugging Face folder the ONNX was exported from: its own tokenizer
    files, else its base model's); ``base_model`` from the ONNX metadata.
    """
    from ..core.models import MINILM_NAMES

    if tokenizer is not None:
        path = Path(tokenizer)
        if tokenizer.lower() in MINILM_NAMES:
            return _load_tokenizer(_base_folder(tokenizer, "--tokenizer"), f"--tokenizer {tokenizer}")
        if _has_tokenizer_files(path):
            return _load_tokenizer(path, f"--tokenizer {tokenizer}")
        if path.is_dir() and (path / "config.json").is_file():
            raise LilyDeployError(f"--tokenizer {tokenizer}: folder has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
        raise LilyDeployError(f"--tokenizer {tokenizer}: not a folder with tokenizer files, nor 'minilm'")
    if model is not None:
        path = Path(model)
        if not path.is_dir():
            raise LilyDeployError(f"--model {model}: not a folder (give the adapter folder, deploy checkpoint or "
                                  "Hugging Face folder the ONNX was exported from)")
        if _has_tokenizer_files(path):
            return _load_tokenizer(path, f"--model {model}")
        from ..core.adapters import is_adapter_dir, read_adapter
        from ..core.deploy import DEPLOY_CONFIG

        spec = None
        if is_adapter_dir(path):
            spec = read_adapter(path).base_spec
        elif (path / DEPLOY_CONFIG).is_file():
            try:
                spec = json.loads((path / DEPLOY_CONFIG).read_text()).get("base_model")
            except json.JSONDecodeError:
                spec = None
        if not spec:
            raise LilyDeployError(f"--model {model}: has no tokenizer files and names no base model; use --tokenizer DIR")
        return _load_tokenizer(_base_folder(spec, f"--model {model} (base model {spec})"), f"--model {model}")
    if base_model:
        where = f"{onnx_path or 'the ONNX model'} (metadata lily_deploy.base_model = {base_model})"
        folder = _base_folder(base_model, where)
        if not _has_tokenizer_files(folder):
            raise LilyDeployError(f"{where}: {folder} has no tokenizer files; give --tokenizer DIR")
        return _load_tokenizer(folder, f"base model {base_model}")
    raise LilyDeployError(f"{onnx_path or 'the ONNX model'}: text data needs the model's tokenizer and the model's "
                          "metadata names no base model; give --tokenizer DIR or --model DIR")


# ---------------------------------------------------------------------------------------
# calibration sets
# ---------------------------------------------------------------------------------------

@dataclass
class CalibSet:
    """Model inputs for chosen rows of a data file, batched, as numpy arrays keyed by input name."""

    source: Path
    batches: list[dict]
    rows: list[int]  # 0-based item index in the data file of each sample, in batch order
    labels: Optional[list[str]] = None  # the data file's label of each sample, when it has labels
    total_rows: int = 0  # rows (items) in the data file
    from_cache: bool = False
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def reader(self):
        """An onnxruntime ``CalibrationDataReader`` over these batches."""
        return ort_reader(self.batches)

    def torch_batches(self) -> Iterator[dict]:
        import torch

        for b in self.batches:
            yield {k: torch.from_numpy(v) for k, v in b.items()}


def ort_reader(batches: Sequence[dict]):
    """An onnxruntime ``CalibrationDataReader`` yielding ``batches`` (rewindable)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self, batches):
            self.batches = list(batches)
            self._it = iter(self.batches)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(self.batches)

        def __len__(self):
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int):
            self._it = iter(self.batches[start_index:end_index])

    return _Reader(batches)


def default_cache_dir() -> Path:
    root = os.environ.get("LILY_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lily-deploy")
    return Path(root) / "calib"


def _data_fingerprint(path: Path) -> str:
    """Content hash of a data file; names, sizes and mtimes of an image folder's files."""
    from ..core.fileio import sha256_file

    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _text_inputs_check(specs: Sequence[InputSpec], path: Path, flag: str) -> None:
    names = [s.name for s in specs]
    if IMAGE_INPUT in names:
        raise LilyDeployError(f"{flag} {path}: is text, but the model takes {', '.join(names)} (give an image folder "
                              "or an .npz with one array per input)")
    unknown = [n for n in names if n not in TEXT_INPUTS]
    if unknown or "input_ids" not in names:
        raise LilyDeployError(f"{flag} {path}: text cannot feed model input {(unknown or ['input_ids'])[0]!r} "
                              f"(the model takes {', '.join(names)}); give an .npz with one array per input")


def _image_inputs_check(specs: Sequence[InputSpec], path: Path, flag: str) -> int:
    names = [s.name for s in specs]
    if names != [IMAGE_INPUT]:
        raise LilyDeployError(f"{flag} {path}: is an image folder, but the model takes {', '.join(names)}")
    spec = specs[0]
    size = spec.fixed(2) or spec.fixed(3)
    if len(spec.shape) != 4 or (spec.fixed(1) not in (None, 3)):
        raise LilyDeployError(f"{flag} {path}: model input {IMAGE_INPUT} has shape {spec.shape}, not [N, 3, H, W]")
    if size is None:
        raise LilyDeployError(f"{flag} {path}: model input {IMAGE_INPUT} has no fixed image size; give an .npz")
    return size


def _check_finite(array, name: str, where: str, row_names: Optional[Sequence[str]] = None, offset: int = 0) -> None:
    """Refuse NaN/Inf in float inputs, naming the first row that holds one."""
    import numpy as np

    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        what = "NaN" if np.isnan(array[i]).any() else "Inf"
        row = row_names[i] if row_names is not None else f"row {offset + i} (0-based)"
        raise LilyDeployError(f"{where}: {row} of {name!r} holds {what}; calibration data must be finite")


def _check_npz_arrays(arrays: dict, specs: Sequence[InputSpec], where: str) -> int:
    """Names, ranks, fixed sizes, dtypes and finiteness of an .npz of model inputs; returns the sample count."""
    import numpy as np

    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names and k != LABEL_KEY]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no array for model input {', '.join(missing)}")
        if extra:
            parts.append(f"arrays {', '.join(extra)} are not model inputs")
        raise LilyDeployError(f"{where}: {'; '.join(parts)} (model inputs: {', '.join(names)}; has: {', '.join(arrays)})")
    n = None
    for s in specs:
        a = arrays[s.name]
        if a.ndim != len(s.shape):
            raise LilyDeployError(f"{where}: {s.name!r} has shape {list(a.shape)}, the model's {s.name} has rank "
                                  f"{len(s.shape)} {s.shape}")
        for axis in range(1, a.ndim):
            want = s.fixed(axis)
            if want is not None and a.shape[axis] != want:
                raise LilyDeployError(f"{where}: {s.name!r} has shape {list(a.shape)}, the model needs {s.shape}")
        want_float = np.issubdtype(s.dtype, np.floating)
        if want_float != np.issubdtype(a.dtype, np.floating) or a.dtype == np.bool_ and s.dtype != np.bool_:
            raise LilyDeployError(f"{where}: {s.name!r} is {a.dtype}, the model's input is {np.dtype(s.dtype).name}")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise LilyDeployError(f"{where}: {s.name!r} has {a.shape[0]} samples, {specs[0].name!r} has {n}")
        _check_finite(a, s.name, where)
    if LABEL_KEY in arrays and len(arrays[LABEL_KEY]) != n:
        raise LilyDeployError(f"{where}: {LABEL_KEY!r} has {len(arrays[LABEL_KEY])} entries for {n} samples")
    return int(n or 0)


def _read_npz(path: Path, where: str) -> dict:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile/ValueError/OSError: all mean "not a usable npz"
        raise LilyDeployError(f"{where}: not a readable .npz ({str(exc).splitlines()[0][:200]})") from None


def choose_rows(total: int, size: Optional[int], seed: int, exclude: Sequence[int] = ()) -> list[int]:
    """``size`` row indices out of ``total`` (minus ``exclude``), a seeded random choice kept in file order."""
    skip = set(exclude)
    pool = [i for i in range(total) if i not in skip]
    return [pool[i] for i in select(pool, size, seed)]


def load_calibration(
    path: str | Path,
    specs: Sequence[InputSpec],
    size: Optional[int] = 256,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int = 128,
    tokenizer: Optional[Tokenizer | Callable[[], Tokenizer]] = None,
    exclude_rows: Sequence[int] = (),
    text_column: Optional[str] = None,
    label_column: Optional[str] = None,
    cache_dir: Optional[str | Path] = None,
    strict: bool = False,
    flag: str = "--calib",
    progress: bool = True,
    warn_short: bool = True,
    uniform_length: bool = False,
) -> CalibSet:
    """Real inputs for ``size`` rows of ``path`` (seeded choice), batched and matched to ``specs``.

    ``exclude_rows`` are left out (the held-out validation rows are those calibration did not
    use). Fewer rows than ``size`` warn (:class:`CalibrationWarning`; a note only when not
    ``warn_short``), or fail under ``strict``. ``tokenizer`` (or a function returning it, called
    only for text) is needed for text data. ``cache_dir`` (None: no cache) holds the tokenised
    batches, keyed by the data file's content, the model's input signature, the tokenizer and
    every setting, and checked against a checksum when read back. ``uniform_length`` pads every
    text batch to the same length (the longest chosen row, at most ``max_length``): histogram
    calibrators (entropy, percentile) stack the batches and need one shape.
    """
    path = Path(path)
    where = f"{flag} {path}"
    if not path.exists():
        raise LilyDeployError(f"{where}: does not exist")
    if batch_size <= 0:
        raise LilyDeployError(f"batch_size {batch_size}: must be at least 1")
    if size is not None and size <= 0:
        raise LilyDeployError(f"size {size}: must be at least 1")
    kind = "npz" if path.suffix.lower() == ".npz" else ("image" if path.is_dir() else "text")
    image_size = None
    if kind == "text":
        tokenizer = _text_tokenizer(specs, path, flag, tokenizer)
    elif kind == "image":
        image_size = _image_inputs_check(specs, path, flag)

    cache = None
    if cache_dir is not None and kind != "npz":  # an .npz is already tensors
        key = _cache_key(path, kind, specs, tokenizer, size=size, seed=seed, batch_size=batch_size,
                         max_length=max_length, image_size=image_size, text_column=text_column,
                         label_column=label_column, uniform_length=uniform_length,
                         exclude=hashlib.sha256(json.dumps(sorted(exclude_rows)).encode()).hexdigest()[:16])
        cache = Path(cache_dir) / f"{key}.npz"
        cached = _read_cache(cache, [s.name for s in specs])
        if cached is not None:
            cached.source = path
            _warn_short(cached, size, where, strict, warn_short)
            return cached

    source = _read_source(path, kind, specs, where, text_column, label_column)
    rows = choose_rows(source.total, size, seed, exclude_rows)
    if not rows:
        raise LilyDeployError(f"{where}: no rows left to use ({source.total} in the file, "
                              f"{len(exclude_rows)} set aside)")
    if kind == "npz":
        encode = functools.partial(_npz_batch, source.arrays, specs)
    elif kind == "image":
        encode = functools.partial(_image_batch, source.items, specs, image_size, where)
    else:
        pad = _text_padding(tokenizer, source.items, rows, max_length, uniform_length)
        encode = functools.partial(_text_batch, tokenizer, source.items, specs, pad, where)
    batches = _encode_rows(encode, rows, batch_size,
                           _progress(len(rows), f"reading {path.name}", progress and kind != "npz"))
    labels = [source.labels[i] for i in rows] if source.labels else None
    result = CalibSet(path, batches, rows, labels, total_rows=source.total)
    if cache is not None:
        _write_cache(cache, result)
    _warn_short(result, size, where, strict, warn_short)
    return result


def _text_tokenizer(specs: Sequence[InputSpec], path: Path, flag: str,
                    tokenizer: Optional[Tokenizer | Callable[[], Tokenizer]]) -> Tokenizer:
    """The tokenizer for text data, resolved only once the data is known to be text for this model."""
    _text_inputs_check(specs, path, flag)
    if callable(tokenizer):
        tokenizer = tokenizer()
    if tokenizer is None:
        raise LilyDeployError(f"{flag} {path}: text data needs the model's tokenizer (--tokenizer DIR or --model DIR)")
    return tokenizer


@dataclass
class _Source:
    """A data file read once: its items (texts, image files) or arrays (.npz), labels and row count."""

    total: int
    labels: Optional[list[str]]
    items: Sequence = ()
    arrays: Optional[dict] = None


def _read_source(path: Path, kind: str, specs: Sequence[InputSpec], where: str,
                 text_column: Optional[str], label_column: Optional[str]) -> _Source:
    if kind == "npz":
        arrays = _read_npz(path, where)
        total = _check_npz_arrays(arrays, specs, where)
        labels = [str(v) for v in arrays[LABEL_KEY].tolist()] if LABEL_KEY in arrays else None
        return _Source(total, labels, arrays=arrays)
    data = read_data(path, text_column=text_column, label_column=label_column)
    items = data.files if kind == "image" else data.texts
    return _Source(len(items), list(data.labels) if data.labels is not None else None, items=items)


def _encode_rows(encode: Callable[[list[int]], dict], rows: list[int], batch_size: int, bar) -> list[dict]:
    """``encode`` each ``batch_size`` chunk of ``rows``, advancing the progress bar (if any)."""
    batches = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batches.append(encode(chunk))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return batches


def _npz_batch(arrays: dict, specs: Sequence[InputSpec], chunk: list[int]) -> dict:
    import numpy as np

    return {s.name: np.ascontiguousarray(arrays[s.name][chunk]).astype(s.dtype, copy=False) for s in specs}


def _image_batch(items: Sequence[Path], specs: Sequence[InputSpec], image_size: int, where: str,
                 chunk: list[int]) -> dict:
    from ..core.data import load_images

    files = [items[i] for i in chunk]
    pixels = load_images(files, image_size).numpy().astype(specs[0].dtype, copy=False)
    _check_finite(pixels, IMAGE_INPUT, where, row_names=[f"image {f}" for f in files])
    return {IMAGE_INPUT: pixels}


def _text_padding(tokenizer: Tokenizer, texts: Sequence[str], rows: list[int], max_length: int,
                  uniform_length: bool) -> dict:
    """Tokenizer padding arguments: to each batch's longest row, or (``uniform_length``) to the longest chosen row."""
    if not uniform_length:
        return {"padding": True, "max_length": max_length}
    ids = tokenizer.tokenizer([texts[i] for i in rows], truncation=True, max_length=max_length)["input_ids"]
    return {"padding": "max_length", "max_length": max(len(i) for i in ids)}


def _text_batch(tokenizer: Tokenizer, texts: Sequence[str], specs: Sequence[InputSpec], pad: dict, where: str,
                chunk: list[int]) -> dict:
    import numpy as np

    enc = tokenizer.tokenizer([texts[i] for i in chunk], truncation=True, return_tensors="np", **pad)
    batch = {}
    for s in specs:
        if s.name in enc:
            batch[s.name] = np.asarray(enc[s.name]).astype(s.dtype, copy=False)
        elif s.name == "token_type_ids":  # BERT-family default: one segment
            batch[s.name] = np.zeros_like(np.asarray(enc["input_ids"]), dtype=s.dtype)
        else:
            raise LilyDeployError(f"{where}: the tokenizer ({tokenizer.source}) gives no {s.name!r}, "
                                  "which the model takes")
    return batch


def _warn_short(cs: CalibSet, size: Optional[int], where: str, strict: bool, warn: bool = True) -> None:
    if size is None or len(cs) >= size:
        return
    msg = f"{where}: {len(cs)} samples available, fewer than the {size} asked for"
    if strict:
        raise LilyDeployError(f"{msg} (strict)")
    cs.notes.append(msg)
    if warn:
        warnings.warn(f"{msg}; continuing with {len(cs)}", CalibrationWarning, stacklevel=3)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total < 64:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="row", leave=False, file=__import__("sys").stderr)


def _cache_key(path: Path, kind: str, specs: Sequence[InputSpec], tokenizer: Optional[Tokenizer],
               **settings) -> str:
    """Hash of what the cached tensors depend on: the data's content, the model's input signature,
    the tokenizer's files and every setting; any change is a different cache file."""
    import numpy as np

    key = {"format": CACHE_FORMAT, "data": _data_fingerprint(path), "kind": kind,
           "inputs": [[s.name, np.dtype(s.dtype).name, [str(d) for d in s.shape]] for s in specs],
           "tokenizer": tokenizer.identity if (tokenizer is not None and kind == "text") else None, **settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _tensor_checksum(arrays: dict) -> str:
    """sha256 over every array's name, dtype, shape and bytes: what a cache read must find again."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _cache_warning(file: Path, why: str) -> None:
    warnings.warn(f"calibration cache {file} {why}; rebuilding it", CalibrationWarning, stacklevel=4)


def _write_cache(file: Path, cs: CalibSet) -> None:
    """Write the batches and their checksum atomically; a cache that cannot be written is skipped, not an error."""
    import numpy as np

    from ..core.fileio import atomic_file

    arrays = {f"b{i}/{k}": v for i, b in enumerate(cs.batches) for k, v in b.items()}
    arrays["rows"] = np.asarray(cs.rows, dtype=np.int64)
    if cs.labels is not None:
        arrays["labels"] = np.asarray(cs.labels, dtype=str)
    meta = {"format": CACHE_FORMAT, "batches": len(cs.batches), "total_rows": cs.total_rows,
            "checksum": _tensor_checksum(arrays)}
    arrays["meta"] = np.asarray(json.dumps(meta))
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(file, "--cache-dir") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except (OSError, LilyDeployError) as exc:
        warnings.warn(f"calibration cache {file} not written ({exc})", CalibrationWarning, stacklevel=3)


def _read_cache(file: Path, names: Sequence[str]) -> Optional[CalibSet]:
    """The cached set, or None: absent (silently), or unreadable / not matching its checksum (a warning)."""
    import numpy as np

    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except Exception as exc:  # garbage, truncated or foreign: zipfile/ValueError/OSError/KeyError/JSON errors
        _cache_warning(file, f"is unreadable ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})")
        return None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or "checksum" not in meta:
        _cache_warning(file, "is not a lily-deploy calibration cache of this version")
        return None
    if _tensor_checksum(arrays) != meta["checksum"]:
        _cache_warning(file, "does not match its checksum (its tensors changed on disk)")
        return None
    try:
        batches = [{n: arrays[f"b{i}/{n}"] for n in names} for i in range(int(meta["batches"]))]
        rows = [int(v) for v in arrays["rows"]]
    except (KeyError, TypeError, ValueError):
        _cache_warning(file, "lacks the batches or rows it should hold")
        return None
    labels = [str(v) for v in arrays["labels"]] if "labels" in arrays else None
    return CalibSet(file, batches, rows, labels, total_rows=int(meta.get("total_rows", 0)), from_cache=True)
