"""Reading and writing ONNX files: one loader with one-line errors, metadata, and the atomic writer.

A written model is staged in a temporary folder beside its destination (model and ``.data``
file together), may be validated there, and is renamed into place only when the caller commits:
a failure, a refused validation or Ctrl-C leaves the destination as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from ..core.errors import LilyDeployError
from ..core.fileio import check_output_parent, publish_mode

# models above this size are written with their weights in a ``.data`` file beside them
LARGE_MODEL_BYTES = 1_800_000_000


def load_onnx(path: str | os.PathLike, flag: Optional[str] = None, external_data: bool = False):
    """The ModelProto at ``path`` (weights left outside unless ``external_data``); one-line errors."""
    import onnx

    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        raise LilyDeployError(f"{where}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as exc:  # protobuf's DecodeError and friends, a missing .data file
        first = (str(exc).splitlines() or [""])[0][:200]
        raise LilyDeployError(f"{where}: not an ONNX model ({type(exc).__name__}: {first})") from None


def metadata(model) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict of strings."""
    return {p.key: p.value for p in model.metadata_props}


def metadata_value(meta: dict, key: str):
    """A metadata entry decoded from JSON where it is JSON, else the raw string (None if absent)."""
    value = meta.get(key)
    if value is None:
        return None
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def onnx_vocab(model) -> Optional[int]:
    """Rows of the embedding table that ``input_ids`` indexes (a Gather on an initializer)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids" \
                and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    return None


def set_metadata(model, meta: dict) -> None:
    """Replace the model's metadata_props (non-string values as sorted JSON) and stamp the producer."""
    from ..core import __version__

    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    model.producer_name = "lily-deploy"
    model.producer_version = __version__


def write_onnx(model, path: Path, external_data: Optional[bool] = None) -> None:
    """Write ``model`` to ``path`` as is (not atomic: use :func:`staged_onnx` for outputs).

    ``external_data``: weights in ``PATH.data`` (True), inside the file (False), or by size (None).
    """
    import onnx

    if external_data is None:
        external_data = model.ByteSize() > LARGE_MODEL_BYTES
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


class StagedOnnx:
    """A model file (and its ``.data``) being written beside its destination; see :func:`staged_onnx`."""

    def __init__(self, output: Path, folder: Path):
        self.output = output
        self.folder = folder
        self.path = folder / output.name
        self.committed = False

    def write(self, model, external_data: Optional[bool] = None) -> Path:
        write_onnx(model, self.path, external_data)
        return self.path

    def commit(self) -> None:
        """Rename the staged ``.data`` file (if any) and then the model onto the destination."""
        data = self.folder / (self.output.name + ".data")
        if data.exists():
            publish_mode(data)
            os.replace(data, self.output.parent / data.name)
        publish_mode(self.path)
        os.replace(self.path, self.output)
        self.committed = True


@contextlib.contextmanager
def staged_onnx(output: str | os.PathLike, flag: str = "-o") -> Iterator[StagedOnnx]:
    """Stage an ONNX output beside ``output``; it replaces ``output`` only if the caller commits."""
    output = check_output_parent(output, flag)
    folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        yield StagedOnnx(output, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
