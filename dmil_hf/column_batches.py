"""Batches of numeric datasets read a whole batch at a time, for `Trainer`'s data loaders.

A `datasets.Dataset` in torch format gives a `DataLoader` its rows one by one and the collator stacks them again: about
2 ms for a batch of 64 rows of `synthetic` on a CPU, as long as a whole training step of joint learning on it.
[`ColumnBatches`] holds each column as one tensor and indexes it once per batch (~20 µs). `train_staged` uses it for
every split whose columns all hold numbers or lists of numbers of one shape (features, padded token ids, images, cached
tower outputs); other splits (strings, lists of different lengths, a transform) keep the row-by-row path.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import default_data_collator

# Columns `default_data_collator` renames or retypes: a dataset holding one keeps its rows' path.
_COLLATOR_SPECIAL = ("label", "label_ids")


def _list_size(chunk: pa.Array) -> int | None:
    """The length every list of a list column has, or None (not a list column, lists of different lengths, nulls)."""
    if chunk.null_count or not (pa.types.is_fixed_size_list(chunk.type) or pa.types.is_list(chunk.type)
                                or pa.types.is_large_list(chunk.type)):
        return None
    if pa.types.is_fixed_size_list(chunk.type):
        return chunk.type.list_size
    lengths = pc.min_max(pc.list_value_length(chunk))
    low, high = lengths["min"].as_py(), lengths["max"].as_py()
    return low if low == high and low is not None else None


def _column_array(column: pa.ChunkedArray) -> np.ndarray | None:
    """A column of numbers or of (nested) lists of numbers of one shape as one array `(rows, *shape)`, or None for any
    other column (strings, lists of different lengths, nulls). A column of one chunk of numbers or fixed-size lists is
    not copied (memory-mapped pages stay on disk)."""
    parts = []
    for chunk in column.chunks:
        shape = []
        while (size := _list_size(chunk)) is not None:
            shape.append(size)
            chunk = chunk.flatten()
        numeric = pa.types.is_integer(chunk.type) or pa.types.is_floating(chunk.type) or pa.types.is_boolean(chunk.type)
        if chunk.null_count or not numeric or chunk.type == pa.uint64():
            return None
        parts.append(chunk.to_numpy(zero_copy_only=False).reshape(-1, *shape))
    if not parts or any(part.shape[1:] != parts[0].shape[1:] for part in parts):
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """The tensor torch formatting of `datasets` gives (integers as int64, floats as float32), sharing `array`'s memory
    where the dtype already is that."""
    with warnings.catch_warnings():  # read-only Arrow buffers: the tensors are only ever indexed, never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    if tensor.is_floating_point():
        return tensor.float()
    return tensor if tensor.dtype == torch.bool else tensor.long()


class ColumnBatches(torch.utils.data.Dataset):
    """
    A dataset's columns as tensors `(rows, ...)` by name; a `DataLoader` reads a batch with `__getitems__` (one index
    per column), which [`collate_batches`] passes through. Built by [`column_batches`].

    Args:
        columns (`dict[str, torch.Tensor]`): one tensor per column, rows first, all of the same length.
    """

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns
        self.num_rows = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return {name: column[rows] for name, column in self.columns.items()}


def column_batches(dataset):
    """`dataset` as [`ColumnBatches`] when it is a `datasets.Dataset` in plain torch format (no transform, no indices
    mapping) whose columns all hold numbers or lists of numbers of one shape, each batch then equal to what its rows and
    `default_data_collator` give; otherwise `dataset` itself."""
    from datasets import Dataset

    form = getattr(dataset, "format", None) or {}
    plain = (isinstance(dataset, Dataset) and form.get("type") == "torch" and not form.get("format_kwargs")
             and not form.get("output_all_columns") and len(dataset) > 0)
    names = (form.get("columns") or dataset.column_names) if plain else ()
    if not plain or any(name in _COLLATOR_SPECIAL for name in names):
        return dataset
    arrays = {name: _column_array(dataset.data.column(name)) for name in names}
    if any(array is None for array in arrays.values()):
        return dataset
    columns = {name: _as_tensor(array) for name, array in arrays.items()}
    # An indices mapping (`select`, `shuffle`: `datasets` keeps it beside the table) picks and orders the rows: the
    # columns keep those rows only.
    mapping = getattr(dataset, "_indices", None)
    if mapping is not None:
        rows = torch.from_numpy(mapping.column(0).to_numpy().astype(np.int64))
        columns = {name: column[rows] for name, column in columns.items()}
    return ColumnBatches(columns)


def collate_batches(features):
    """The data collator for [`ColumnBatches`] beside other datasets: a batch it read whole passes through; rows go to
    `default_data_collator`."""
    return features if isinstance(features, dict) else default_data_collator(features)


__all__ = ["ColumnBatches", "collate_batches", "column_batches"]
