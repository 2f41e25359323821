"""The 64-row, two-feature-modality dataset both DDP scripts train on (`alpha` informative, `beta` noise)."""

import numpy as np
from datasets import Dataset


def feature_rows() -> Dataset:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 64)
    return Dataset.from_dict({
        "alpha_features": (np.eye(3)[labels] @ rng.normal(size=(3, 6)) + rng.normal(size=(64, 6))).astype(np.float32),
        "beta_features": rng.normal(size=(64, 4)).astype(np.float32),
        "labels": labels,
    })
