"""Dataset-level interaction estimate for continuous (or discrete) modalities: k-means codes + exact BROJA PID."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler

from ._checks import as_class_ids, check_modalities, check_same_length
from .pid import pid_from_samples

KMEANS_N_INIT = 4


def discretize(values: np.ndarray, n_clusters: int = 10, seed: int = 0) -> np.ndarray:
    """
    Discrete codes `(N,)` for one modality.

    Arrays with at most `n_clusters` distinct rows (e.g. integer ids, binary features) and string arrays keep their
    distinct values as codes; anything else is standardised (zero mean, unit variance per feature) and clustered
    with k-means (`n_clusters` clusters, `KMEANS_N_INIT` restarts, `random_state=seed`).
    """
    values = np.asarray(values)
    rows = values.reshape(len(values), -1)
    distinct, codes = np.unique(rows, axis=0, return_inverse=True)
    if len(distinct) <= n_clusters or values.dtype.kind in "USO":
        return codes.ravel()
    features = StandardScaler().fit_transform(rows.astype(np.float64))
    return KMeans(n_clusters=n_clusters, n_init=KMEANS_N_INIT, random_state=seed).fit_predict(features)


def estimate_interactions(modalities: dict, labels, *, n_clusters: int = 10, seed: int = 0, **solver_kwargs) -> dict:
    """
    Redundancy, uniqueness and synergy of a dataset's modalities about its labels, in bits.

    Each modality is reduced to discrete codes by [`discretize`] (k-means on standardised features; arrays with few
    distinct values are used as they are), and the exact BROJA decomposition of the empirical joint distribution of
    (codes_a, codes_b, label) is computed for every pair of modalities. This is the "CVX" estimator of Liang et al.
    (NeurIPS 2023) with k-means in place of their clustering; it is a plug-in estimate, biased upward (mostly into
    synergy) when there are few samples per cell of the (n_clusters, n_clusters, n_classes) table: keep
    `n_clusters` small enough that N is well above n_clusters^2 * n_classes (a warning says when it is not).

    With two modalities the result is their decomposition. With M > 2 modalities the top-level numbers summarise
    the M(M-1)/2 pairwise decompositions (they are not a decomposition of I(X_1..X_M; Y)): redundancy, synergy and
    total are means over pairs; `unique[m]` is the mean of U_m over the pairs that contain m. Every pair is listed
    under `pairs`.

    Args:
        modalities (`dict[str, np.ndarray]`): at least two arrays of shape `(N,)` or `(N, d)`.
        labels (`np.ndarray` of shape `(N,)`): discrete class labels.
        n_clusters (`int`): k-means clusters per modality.
        seed (`int`): k-means random state.
        **solver_kwargs: passed to [`pid_from_table`] (`tol`, `max_iterations`, `method`).

    Returns:
        `dict`: `{"units": "bits", "redundancy", "unique": {name: float}, "synergy", "total", "pairs": [...],
        "method": {"estimator": "broja-kmeans", "n_clusters", "seed", "n_samples", "converged"}}`.

    Example:
    ```python
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.integers(0, 2, 1000), rng.integers(0, 2, 1000)
    >>> result = estimate_interactions({"a": a, "b": b}, a ^ b)
    >>> round(result["synergy"], 2)
    1.0
    ```
    """
    arrays = check_modalities(modalities)
    _, label_ids = as_class_ids(labels)
    n_samples = check_same_length({**arrays, "labels": label_ids})
    if not (isinstance(n_clusters, (int, np.integer)) and n_clusters >= 2):
        raise ValueError(f"`n_clusters` must be an integer >= 2; got {n_clusters!r}.")
    codes = {name: discretize(values, n_clusters, seed) for name, values in arrays.items()}
    n_classes = int(label_ids.max()) + 1

    pairs = []
    for a, b in itertools.combinations(codes, 2):
        cells = (codes[a].max() + 1) * (codes[b].max() + 1) * n_classes
        if n_samples < cells:
            warnings.warn(f"{n_samples} samples for a {cells}-cell table ({a}, {b}, label): the plug-in estimate is "
                          f"biased toward synergy; use fewer clusters (n_clusters={n_clusters}).", stacklevel=2)
        result = pid_from_samples(codes[a], codes[b], label_ids, **solver_kwargs)
        pairs.append({
            "modalities": [a, b],
            "redundancy": result.redundancy,
            "unique": {a: result.unique[0], b: result.unique[1]},
            "synergy": result.synergy,
            "total": result.total,
            "converged": result.converged,
        })
    return {
        "units": "bits",
        "redundancy": float(np.mean([p["redundancy"] for p in pairs])),
        "unique": {m: float(np.mean([p["unique"][m] for p in pairs if m in p["unique"]])) for m in codes},
        "synergy": float(np.mean([p["synergy"] for p in pairs])),
        "total": float(np.mean([p["total"] for p in pairs])),
        "pairs": pairs,
        "method": {
            "estimator": "broja-kmeans",
            "n_clusters": int(n_clusters),
            "seed": seed,
            "n_samples": n_samples,
            "converged": all(p["converged"] for p in pairs),
        },
    }


__all__ = ["discretize", "estimate_interactions"]
