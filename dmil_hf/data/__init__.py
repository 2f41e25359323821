"""Datasets in the `dmil_hf` column schema: validation and loading (`schema`), the built-in `synthetic` and `digits`
datasets with known interaction types and Bayes accuracies, and degraded test sets (`degrade`)."""

from .corruption import add_training_corruption
from .degrade import DEGRADATIONS, Degradation, degrade_split, degraded_test_sets, parse_degraded_name
from .digits import make_digits
from .schema import DatasetSchema, dataset_metadata, inspect_dataset, load_dataset_from_name_or_path
from .synthetic import make_synthetic

__all__ = [
    "DEGRADATIONS",
    "Degradation",
    "add_training_corruption",
    "parse_degraded_name",
    "DatasetSchema",
    "dataset_metadata",
    "degrade_split",
    "degraded_test_sets",
    "inspect_dataset",
    "load_dataset_from_name_or_path",
    "make_digits",
    "make_synthetic",
]
