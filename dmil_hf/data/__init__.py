"""Datasets in the `dmil_hf` column schema: validation and loading (`schema`), the built-in `synthetic` and `digits`
datasets with known interaction types and Bayes accuracies, and degraded test sets (`degrade`)."""

from .degrade import degrade_split, degraded_test_sets
from .digits import make_digits
from .schema import DatasetSchema, dataset_metadata, inspect_dataset, load_dataset_from_name_or_path
from .synthetic import make_synthetic

__all__ = [
    "DatasetSchema",
    "dataset_metadata",
    "degrade_split",
    "degraded_test_sets",
    "inspect_dataset",
    "load_dataset_from_name_or_path",
    "make_digits",
    "make_synthetic",
]
