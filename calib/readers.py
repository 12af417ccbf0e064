"""Calibration readers: a data file becomes real model inputs, in batches.

The same reader feeds router statistics (``fold``, ``inspect --data``) as torch tensors and
INT8 calibration (``quantize``) as numpy through onnxruntime's ``CalibrationDataReader``.
"""
from __future__ import annotations

import random
from typing import Iterator, Optional, Sequence

from lily_deploy.data import encode_batch, read_data


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
