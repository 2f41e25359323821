"""Numeric splits read a batch at a time (`dmil_hf.column_batches`): the same batches as the rows and
`default_data_collator`, the same training; other splits keep the rows' path."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import default_data_collator

from dmil_hf.column_batches import ColumnBatches, collate_batches, column_batches
from dmil_hf.interactions import make_compute_metrics
from dmil_hf.training import train_staged

from test_training import args_for, encoded, feature_dataset, feature_model


def _rows(dataset, indices):
    return default_data_collator(dataset.__getitems__(indices))


def _assert_same_batch(got, expected):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


def test_batches_equal_the_rows_and_the_collator():
    rng = np.random.default_rng(0)
    columns = {"a_features": rng.normal(size=(40, 3)).astype(np.float64),  # float64: torch format gives float32
               "vision_pixel_values": rng.random((40, 1, 4, 4)).astype(np.float32).tolist(),  # nested lists
               "text_input_ids": rng.integers(0, 9, (40, 5)).astype(np.int32).tolist(),
               "modality_mask": rng.random((40, 2)) > 0.5,
               "labels": rng.integers(0, 3, 40)}
    dataset = Dataset.from_dict(columns).with_format("torch")
    for split in (dataset, dataset.select([5, 3, 30, 0, 9]), dataset.shuffle(seed=1)):  # indices mappings too
        batches = column_batches(split)
        assert isinstance(batches, ColumnBatches) and len(batches) == len(split)
        indices = [4, 0, 2, 1]
        _assert_same_batch(collate_batches(batches.__getitems__(indices)), _rows(split, indices))
        _assert_same_batch(batches[3], split[3])


@pytest.mark.parametrize("columns", [
    {"a_features": [[1.0, 2.0], [3.0]], "labels": [0, 1]},  # lists of different lengths
    {"a_features": [[1.0], [2.0]], "interaction": ["x", "y"]},  # strings
    {"a_features": [[1.0], None], "labels": [0, 1]},  # a missing value
    {"a_features": [[1.0], [2.0]], "label": [0, 1]},  # the collator renames "label"
])
def test_other_splits_keep_the_rows_path(columns):
    dataset = Dataset.from_dict(columns).with_format("torch")
    assert column_batches(dataset) is dataset
    plain = Dataset.from_dict({"labels": [0, 1]})  # not in torch format
    assert column_batches(plain) is plain


def test_training_reads_batches_and_trains_as_the_rows_do(tmp_path):
    """`train_staged` reads numeric splits a batch at a time; the weights are those of the rows' path, bit for bit."""
    data = encoded(feature_dataset())
    assert isinstance(column_batches(data["train"]), ColumnBatches)
    weights = []
    for name, collator in (("rows", default_data_collator), ("batches", None)):
        model = feature_model(stage1_epochs=1, stage2_epochs=1, stage3_epochs=1)
        train_staged(model, args_for(tmp_path / name), data["train"], data["validation"], data_collator=collator,
                     compute_metrics=make_compute_metrics())
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
