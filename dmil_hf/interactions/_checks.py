"""Input checks shared by the estimators: each raises ValueError naming the argument and what was expected."""

from __future__ import annotations

import numpy as np

SUM_TOLERANCE = 1e-6


def as_finite_array(values, name: str, *, ndim: tuple[int, ...] | None = None, dtype=None) -> np.ndarray:
    """`values` as an array of the given rank(s), refusing NaN and infinities (numeric arrays only)."""
    array = np.asarray(values, dtype=dtype)
    if ndim is not None and array.ndim not in ndim:
        expected = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"`{name}` must be a {expected} array; got shape {array.shape}.")
    if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contains NaN or infinite values; expected finite numbers.")
    return array


def check_distribution(values, name: str, *, ndim: int, axis=None) -> np.ndarray:
    """A probability table (`axis=None`: the whole table sums to one) or rows of probabilities (`axis=-1`)."""
    array = as_finite_array(values, name, ndim=(ndim,), dtype=np.float64)
    if array.size == 0:
        raise ValueError(f"`{name}` is empty; expected probabilities.")
    if np.any(array < 0):
        raise ValueError(f"`{name}` has negative entries (min {array.min():.3g}); expected probabilities >= 0.")
    sums = array.sum(axis=axis)
    if axis is None and abs(sums - 1.0) > SUM_TOLERANCE:
        raise ValueError(f"`{name}` must sum to 1 within {SUM_TOLERANCE:g}; got {sums:.8g}.")
    if axis is not None and np.any(np.abs(sums - 1.0) > SUM_TOLERANCE):
        row = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(
            f"each row of `{name}` must sum to 1 within {SUM_TOLERANCE:g}; row {row} sums to {sums[row]:.8g}."
        )
    return array / (sums if axis is None else sums[..., None])


def check_same_length(arrays: dict[str, np.ndarray]) -> int:
    """The common number of rows of `arrays` (name -> array); refuses mismatches and empty inputs."""
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same number of rows; got {lengths}.")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"inputs are empty; expected at least one row in each of {list(lengths)}.")
    return n


def check_modalities(modalities, name: str = "modalities") -> dict[str, np.ndarray]:
    """A dict of at least two named per-sample arrays `(N,)` or `(N, d)`, finite, all with N rows."""
    if not isinstance(modalities, dict):
        raise ValueError(f"`{name}` must be a dict mapping modality names to arrays; got {type(modalities).__name__}.")
    if len(modalities) < 2:
        raise ValueError(f"`{name}` must hold at least two modalities; got {list(modalities)}.")
    arrays = {str(k): as_finite_array(v, f"{name}[{k!r}]", ndim=(1, 2)) for k, v in modalities.items()}
    check_same_length(arrays)
    return arrays


def as_class_ids(labels, name: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """`(classes, ids)`: the distinct values of a 1-D discrete array and each row's index into them."""
    array = as_finite_array(labels, name, ndim=(1,))
    if array.dtype.kind == "f" and np.any(array != np.round(array)):
        raise ValueError(f"`{name}` must hold discrete class labels; got non-integer floats (regression targets?).")
    return np.unique(array, return_inverse=True)


__all__ = ["as_class_ids", "as_finite_array", "check_distribution", "check_modalities", "check_same_length"]
