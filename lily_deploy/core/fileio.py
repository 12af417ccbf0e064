"""Atomic outputs and content hashes.

A failure or Ctrl-C must never leave a half-written model, engine or report: every
writer goes through a temporary sibling that is renamed into place only once complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import LilyDeployError


def check_output_parent(path: str | os.PathLike, flag: str = "-o") -> Path:
    """Fail early, naming the flag, when the folder an output goes into does not exist."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LilyDeployError(f"{flag} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LilyDeployError(f"{flag} {path}: folder {parent} is not writable")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike) -> None:
    """Give a finished output the mode of an ordinary file (or folder) under the user's umask.

    ``mkstemp``/``mkdtemp`` create 0600/0700 and the mode survives the rename, which would leave
    engines and models unreadable to a serving account.
    """
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def _same_or_inside(output: Path, source: Path) -> bool:
    """Whether ``output`` is ``source`` (the same file, by path or inode) or lies inside folder ``source``."""
    out, src = output.resolve(), source.resolve()
    if out == src or (output.exists() and source.exists() and os.path.samefile(output, source)):
        return True
    return source.is_dir() and (src in out.parents or out == src)


def check_not_input(output: str | os.PathLike, inputs: dict, flag: str = "-o") -> None:
    """Refuse an output that is one of the command's inputs or lies inside an input folder.

    ``inputs`` maps a name for the message (a flag or "ONNX model") to a path (or None). An
    input's sidecar files count too: ``model.onnx.data`` of an ONNX input, ``ENGINE.json`` of an engine.
    """
    output = Path(output)
    for what, source in inputs.items():
        if source is None or not str(source):
            continue
        source = Path(str(source))
        if not source.exists():
            continue
        related = [source]
        if source.is_file():
            related += [source.with_name(source.name + ".data"), source.with_name(source.name + ".json")]
        for item in related:
            if item.exists() and _same_or_inside(output, item):
                where = "is" if item == source else f"is {item.name}, a file of"
                if source.is_dir() and output.resolve() != source.resolve():
                    where = "lies inside"
                raise LilyDeployError(f"{flag} {output}: {where} the input {what} {source}; "
                                      "write the output somewhere else (inputs are never overwritten)")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, flag: str = "-o") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = check_output_parent(path, flag)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, flag: str = "-o") -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; swap it in for ``path`` only on success."""
    path = check_output_parent(path, flag)
    if path.exists() and not path.is_dir():
        raise LilyDeployError(f"{flag} {path}: exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        publish_mode(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj, flag: str = "-o") -> None:
    with atomic_file(path, flag) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike, patterns=("*.json", "*.safetensors")) -> str:
    """Hash of a folder's weight and config files (names and contents), order-independent."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in path.glob(pat) if p.is_file()})
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()
