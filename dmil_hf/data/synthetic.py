"""`synthetic`: feature modalities `a`, `b`, ... with a known interaction type per sample and a known Bayes accuracy.

Generative model (all prototypes are fixed random draws of `seed`). Every sample has an interaction type `t` and a
label `y` (uniform over `num_classes`); every modality `m` shows one class value `v_m`:

- `redundancy`: `v_m = y` in every modality, so each one alone determines the label;
- `unique_<m>`: `v_m = y`; every other modality shows an independent uniform value (nothing about `y`);
- `synergy`: `v_a = u` uniform, `v_b = (y - u) mod num_classes`, others uniform: each modality alone is independent
  of `y`, the pair determines it.

Modality `m`'s vector is a random rotation of `[type code, value code]`: the first `code_dim = max(1, feature_dim //
4)` coordinates hold a prototype of `t` (norm 3), the rest a prototype of `v_m` (norm 2), plus isotropic Gaussian noise
of standard deviation `noise` in every coordinate. The type code makes the type recoverable; it says nothing about
`y` (types and labels are independent), so on synergy samples no single modality reveals the label even though each
one reveals the type.

Multi-label (`multi_label=True`): `labels` is multi-hot over the `num_classes` labels: label `y` is present, and for
even `y` also label `(y + 1) mod num_classes`. The set and `y` determine each other, so every sample keeps its
interaction type and every Bayes figure holds for the set (exact match).

The Bayes-optimal classifier is the posterior argmax under this exact model (computed in closed form per sample,
summing over types and hidden values). Its accuracy is estimated by Monte Carlo on `bayes_samples` fresh samples per
type, with every modality and with each one missing (also the optimum for a `noise_<m>` test set, for an observer
that knows the column is noise); `dataset_metadata(dsd)` returns them.
"""

from __future__ import annotations

import numpy as np
from datasets import DatasetDict

from ._build import assemble, mixture_shares, split_sizes, type_sequence

FEATURE_MODALITIES = ("a", "b", "c", "d")
TYPE_CODE_NORM = 3.0
VALUE_CODE_NORM = 2.0


def interaction_types(num_modalities: int) -> tuple:
    names = FEATURE_MODALITIES[:num_modalities]
    return ("redundancy",) + tuple(f"unique_{m}" for m in names) + ("synergy",)


def _logsumexp(x: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    out = top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))
    return out if keepdims else out.squeeze(axis)


def _squared_distances(x: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """(n, d), (k, d) -> (n, k) squared Euclidean distances."""
    return (x ** 2).sum(1, keepdims=True) - 2 * x @ prototypes.T + (prototypes ** 2).sum(1)[None]


class _Model:
    """The generative model's parameters and its exact per-sample posterior over labels."""

    def __init__(self, num_modalities, num_classes, feature_dim, noise, shares, seed):
        rng = np.random.default_rng([seed, 1])
        self.M, self.C, self.noise = num_modalities, num_classes, noise
        self.types = interaction_types(num_modalities)
        self.log_prior = np.log(np.maximum([shares[t] for t in self.types], 1e-300))
        self.prior_mask = np.array([shares[t] > 0 for t in self.types])
        self.code_dim = max(1, feature_dim // 4)
        value_dim = feature_dim - self.code_dim

        def prototypes(count, dim, norm):
            p = rng.normal(size=(count, dim))
            return norm * p / np.linalg.norm(p, axis=1, keepdims=True)

        self.type_codes = [prototypes(len(self.types), self.code_dim, TYPE_CODE_NORM) for _ in range(self.M)]
        self.value_codes = [prototypes(num_classes, value_dim, VALUE_CODE_NORM) for _ in range(self.M)]
        self.rotations = [np.linalg.qr(rng.normal(size=(feature_dim, feature_dim)))[0] for _ in range(self.M)]

    def sample(self, types: np.ndarray, rng: np.random.Generator):
        """Inputs (one float32 array (n, feature_dim) per modality) and labels for the given type indices."""
        n, C = len(types), self.C
        y = rng.integers(0, C, n)
        values = rng.integers(0, C, (n, self.M))
        redundant = types == 0
        values[redundant] = y[redundant, None]
        for m in range(self.M):
            unique = types == 1 + m
            values[unique, m] = y[unique]
        synergy = types == self.M + 1
        values[synergy, 1] = (y[synergy] - values[synergy, 0]) % C
        inputs = []
        for m in range(self.M):
            clean = np.concatenate([self.type_codes[m][types], self.value_codes[m][values[:, m]]], axis=1)
            noisy = clean + self.noise * rng.normal(size=clean.shape)
            inputs.append((noisy @ self.rotations[m].T).astype(np.float32))
        return inputs, y

    def log_posterior(self, inputs, present=None) -> np.ndarray:
        """log p(y | the present modalities) up to a constant, shape (n, num_classes)."""
        present = range(self.M) if present is None else present
        n, C, var = len(inputs[0]), self.C, self.noise ** 2
        type_ll = np.zeros((n, len(self.types)))
        value_ll = [np.zeros((n, C)) for _ in range(self.M)]  # a missing modality: flat likelihood
        for m in present:
            z = inputs[m].astype(np.float64) @ self.rotations[m]  # undo the rotation
            code, value = z[:, : self.code_dim], z[:, self.code_dim:]
            type_ll += -_squared_distances(code, self.type_codes[m]) / (2 * var)
            value_ll[m] = -_squared_distances(value, self.value_codes[m]) / (2 * var)
        # log of the average likelihood over a uniform hidden value, per modality
        flat = [_logsumexp(ll, axis=1, keepdims=True) - np.log(C) for ll in value_ll]
        per_type = [sum(value_ll)]  # redundancy
        for k in range(self.M):  # unique_k
            per_type.append(value_ll[k] + sum(flat[m] for m in range(self.M) if m != k))
        u = np.arange(C)
        pair = value_ll[0][:, None, :] + value_ll[1][:, (np.arange(C)[:, None] - u[None, :]) % C]  # (n, y, u)
        per_type.append(_logsumexp(pair, axis=2) - np.log(C) + sum(flat[m] for m in range(2, self.M)))
        joint = np.stack(per_type, axis=1) + (type_ll + self.log_prior)[:, :, None]  # (n, type, y)
        joint = np.where(self.prior_mask[None, :, None], joint, -np.inf)
        return _logsumexp(joint, axis=1)

    def bayes_accuracy(self, samples_per_type: int, seed: int, shares: dict) -> dict:
        """Monte Carlo accuracy of the posterior argmax per type, overall, and with each modality missing."""
        rng = np.random.default_rng([seed, 2])
        full, missing = {}, {m: {} for m in FEATURE_MODALITIES[: self.M]}
        for index, kind in enumerate(self.types):
            if shares[kind] == 0:
                continue
            inputs, y = self.sample(np.full(samples_per_type, index), rng)
            full[kind] = float((self.log_posterior(inputs).argmax(1) == y).mean())
            for m, name in enumerate(FEATURE_MODALITIES[: self.M]):
                present = [k for k in range(self.M) if k != m]
                missing[name][kind] = float((self.log_posterior(inputs, present).argmax(1) == y).mean())

        def with_overall(by_type):
            return {"overall": round(sum(shares[k] * a for k, a in by_type.items()), 6), **by_type}

        degraded = {}
        for name, by_type in missing.items():
            degraded[f"missing_{name}"] = degraded[f"noise_{name}"] = with_overall(by_type)
        return {"bayes_accuracy": with_overall(full), "bayes_accuracy_degraded": degraded}


def make_synthetic(num_modalities: int = 2, num_classes: int = 4, num_samples: int = 3000, feature_dim: int = 16,
                   noise: float = 0.5, mixture: dict | None = None, seed: int = 0, validation_fraction: float = 0.15,
                   test_fraction: float = 0.15, bayes_samples: int = 20000, multi_label: bool = False) -> DatasetDict:
    """
    The `synthetic` dataset (see the module docstring): columns `a_features`, `b_features`, ... (float32,
    `feature_dim` wide), `labels` (int64; with `multi_label=True` multi-hot float32 `(num_classes,)`, see the module
    docstring: train with `problem_type="multi_label_classification"`) and `interaction`. `mixture` maps interaction types (`redundancy`,
    `unique_a`, ..., `synergy`) to shares (normalised; default equal shares over all `num_modalities + 2` types).
    Deterministic in `seed`. Metadata (`dataset_metadata`): the Bayes accuracy per type and overall (Monte Carlo with
    `bayes_samples` samples per type), the same with each modality missing, and the Bayes classifier's accuracy on
    each split's actual samples.
    """
    if not 2 <= int(num_modalities) <= len(FEATURE_MODALITIES):
        raise ValueError(f"num_modalities must be between 2 and {len(FEATURE_MODALITIES)}; got {num_modalities}.")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2; got {num_classes}.")
    if int(feature_dim) < 2:
        raise ValueError(f"feature_dim must be at least 2 (type code + value code); got {feature_dim}.")
    if not noise > 0:
        raise ValueError(f"noise must be positive; got {noise}.")
    num_modalities, num_classes, feature_dim = int(num_modalities), int(num_classes), int(feature_dim)
    sizes = split_sizes(int(num_samples), validation_fraction, test_fraction)
    types = interaction_types(num_modalities)
    shares = mixture_shares(types, mixture)
    model = _Model(num_modalities, num_classes, feature_dim, float(noise), shares, seed)
    rng = np.random.default_rng([seed, 0])
    type_index = type_sequence(shares, int(num_samples), rng)
    inputs, labels = model.sample(type_index, rng)
    names = FEATURE_MODALITIES[:num_modalities]
    columns = {f"{m}_features": x for m, x in zip(names, inputs)}
    columns["labels"] = multi_hot(labels, num_classes) if multi_label else labels.astype(np.int64)
    interaction = np.array(types, dtype=object)[type_index]

    metadata = {
        "name": "synthetic",
        "builder_kwargs": {"num_modalities": num_modalities, "num_classes": num_classes,
                           "num_samples": int(num_samples), "feature_dim": feature_dim, "noise": float(noise),
                           "mixture": shares, "seed": seed, "validation_fraction": validation_fraction,
                           "test_fraction": test_fraction, "multi_label": bool(multi_label)},
        "interaction_types": list(types),
        "mixture": shares,
        "label_names": [str(i) for i in range(num_classes)],
        "bayes_method": f"Monte Carlo, {bayes_samples} samples per type, exact posterior of the generative model",
    }
    metadata.update(model.bayes_accuracy(int(bayes_samples), seed, shares))
    bounds = np.cumsum((0,) + sizes)
    splits, empirical = {}, {}
    predictions = model.log_posterior(inputs).argmax(1)  # the label set too: it is a function of the class
    for name, start, stop in zip(("train", "validation", "test"), bounds[:-1], bounds[1:]):
        splits[name] = {k: v[start:stop] for k, v in columns.items()}
        splits[name]["interaction"] = interaction[start:stop].tolist()
        correct = predictions[start:stop] == labels[start:stop]
        kinds = interaction[start:stop]
        empirical[name] = {"overall": float(correct.mean()),
                           **{k: float(correct[kinds == k].mean()) for k in types if (kinds == k).any()}}
    metadata["bayes_classifier_accuracy_by_split"] = empirical
    return assemble(splits, metadata)


def multi_hot(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """The multi-label version's label sets: label `y`, and for even `y` also `(y + 1) mod num_classes`;
    `(n,)` class ids -> `(n, num_classes)` float32."""
    sets = np.zeros((len(classes), num_classes), dtype=np.float32)
    rows = np.arange(len(classes))
    sets[rows, classes] = 1.0
    even = classes % 2 == 0
    sets[rows[even], (classes[even] + 1) % num_classes] = 1.0
    return sets


__all__ = ["FEATURE_MODALITIES", "interaction_types", "make_synthetic", "multi_hot"]
