"""Per-sample interaction estimates from classifier probabilities (pointwise minimum-mutual-information PID)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from ._checks import as_class_ids, as_finite_array, check_distribution, check_modalities, check_same_length

# Probabilities are floored here before taking logs, so a confidently wrong classifier gives a large negative (not
# infinite) pointwise information.
PROBABILITY_FLOOR = 1e-12


def pointwise_interactions(unimodal_probs: dict, joint_probs, labels, prior=None) -> dict[str, np.ndarray]:
    """
    Split each sample's label information into redundancy, uniqueness and synergy, in bits.

    For sample i with label y_i, the pointwise information of modality m and of all modalities together are

        i_m = log2 p(y_i | x_m) / p(y_i),        i_joint = log2 p(y_i | x_1, ..., x_M) / p(y_i),

    read from classifiers' predicted probabilities. The split mirrors the minimum-mutual-information PID
    (R = min_m I(X_m;Y), U_m = I(X_m;Y) - R, S = I(X_1..X_M;Y) - max_m I(X_m;Y)) applied to each sample, clipped at 0
    (pointwise information can be negative, "misinformation"):

        r = max(0, i_(2)),   u_m = max(0, i_m - r),   s = max(0, i_joint - max_m i_m),

    where i_(2) is the second largest i_m: with two modalities the minimum; with more, what at least two modalities
    share (the minimum over all would let one uninformative modality turn every redundant sample into a unique one).

    Averages over samples are therefore not a dataset-level PID; they rank samples and groups of samples.

    Args:
        unimodal_probs (`dict[str, np.ndarray]`): at least two arrays `(N, C)` of p(y | x_m); rows sum to 1.
        joint_probs (`np.ndarray` of shape `(N, C)`): p(y | all modalities).
        labels (`np.ndarray` of shape `(N,)`): integer labels in `[0, C)`.
        prior (`np.ndarray` of shape `(C,)`, *optional*): p(y); defaults to the label frequencies of `labels`.

    Returns:
        `dict[str, np.ndarray]`, each of shape `(N,)`: `"redundancy"`, `"unique_<m>"` per modality, `"synergy"`, and
        the raw `"information_<m>"` per modality and `"joint_information"`.
    """
    if not isinstance(unimodal_probs, dict) or len(unimodal_probs) < 2:
        got = list(unimodal_probs) if isinstance(unimodal_probs, dict) else type(unimodal_probs).__name__
        raise ValueError(f"`unimodal_probs` must be a dict of at least two modalities' (N, C) probabilities; got {got}.")
    probs = {m: check_distribution(p, f"unimodal_probs[{m!r}]", ndim=2, axis=-1) for m, p in unimodal_probs.items()}
    joint = check_distribution(joint_probs, "joint_probs", ndim=2, axis=-1)
    labels = as_finite_array(labels, "labels", ndim=(1,))
    check_same_length({**{f"unimodal_probs[{m!r}]": p for m, p in probs.items()}, "joint_probs": joint,
                       "labels": labels})
    n_classes = joint.shape[1]
    widths = {m: p.shape[1] for m, p in probs.items() if p.shape[1] != n_classes}
    if widths:
        raise ValueError(f"every probability array must have {n_classes} columns like `joint_probs`; got {widths}.")
    if labels.dtype.kind not in "iub" or labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"`labels` must be integers in [0, {n_classes}); got dtype {labels.dtype} with range "
                         f"[{labels.min()}, {labels.max()}].")
    labels = labels.astype(np.intp)  # bool labels would index as a mask
    if prior is None:
        prior = np.bincount(labels, minlength=n_classes) / len(labels)
    else:
        prior = check_distribution(prior, "prior", ndim=1)
        if len(prior) != n_classes or np.any(prior[labels] <= 0):
            raise ValueError(f"`prior` must have {n_classes} entries, positive for every label present; got {prior}.")

    rows = np.arange(len(labels))
    log_prior = np.log2(prior[labels])

    def information(p):
        return np.log2(np.maximum(p[rows, labels], PROBABILITY_FLOOR)) - log_prior

    info = {m: information(p) for m, p in probs.items()}
    stacked = np.stack(list(info.values()))
    joint_info = information(joint)
    redundancy = np.maximum(0.0, np.sort(stacked, axis=0)[-2])
    result = {"redundancy": redundancy}
    result.update({f"unique_{m}": np.maximum(0.0, i - redundancy) for m, i in info.items()})
    result["synergy"] = np.maximum(0.0, joint_info - stacked.max(axis=0))
    result.update({f"information_{m}": i for m, i in info.items()})
    result["joint_information"] = joint_info
    return result


def _feature_matrix(values: np.ndarray) -> np.ndarray:
    """2-D float features; a 1-D integer/string id column becomes one-hot (ids are not magnitudes)."""
    if values.ndim == 1 and values.dtype.kind in "iubUSO":
        return OneHotEncoder(sparse_output=False).fit_transform(values.reshape(-1, 1))
    return values.reshape(len(values), -1).astype(np.float64)


def _classifier(kind: str, seed: int, hidden_layer_sizes, max_iter: int):
    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    if kind == "mlp":
        return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=hidden_layer_sizes, max_iter=max_iter,
                                                             random_state=seed))
    raise ValueError(f"`unimodal` must be 'mlp' or 'logistic'; got {kind!r}.")


def fit_pointwise_classifiers(modalities: dict, labels, *, seed: int = 0, n_folds: int = 5, unimodal: str = "mlp",
                              hidden_layer_sizes=(64,), max_iter: int = 500) -> tuple[dict, np.ndarray]:
    """
    Out-of-fold p(y | x_m) for each modality and p(y | all modalities), for [`pointwise_interactions`].

    Every sample's probabilities come from a model that did not train on it (`cross_val_predict` over stratified
    folds). The joint model is an MLP on the concatenated standardised features: synergy (XOR-like signals) needs a
    non-linear model. The unimodal models are MLPs of the same size by default, so that the joint model does not
    win merely by capacity (which would show up as spurious synergy); `unimodal="logistic"` is faster.
    1-D integer or string modalities are one-hot encoded. MLP convergence warnings are silenced: the out-of-fold
    probabilities are used as they are.

    Args:
        modalities (`dict[str, np.ndarray]`): at least two arrays of shape `(N,)` or `(N, d)`.
        labels (`np.ndarray` of shape `(N,)`): discrete class labels.
        seed (`int`): fold shuffling and MLP initialisation.
        n_folds (`int`): folds (lowered to the size of the rarest class when that is smaller; at least 2).

    Returns:
        `(unimodal_probs, joint_probs)`: `dict[str, (N, C)]` and `(N, C)`, columns in the order of the sorted
        distinct labels.
    """
    arrays = check_modalities(modalities)
    _, label_ids = as_class_ids(labels)
    check_same_length({**arrays, "labels": label_ids})
    counts = np.bincount(label_ids)
    if len(counts) < 2:
        raise ValueError("`labels` must hold at least two classes.")
    folds = StratifiedKFold(n_splits=max(2, min(n_folds, int(counts.min()))), shuffle=True, random_state=seed)
    features = {m: _feature_matrix(v) for m, v in arrays.items()}

    def out_of_fold(model, x):
        return cross_val_predict(model, x, label_ids, cv=folds, method="predict_proba")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        unimodal_probs = {m: out_of_fold(_classifier(unimodal, seed, hidden_layer_sizes, max_iter), x)
                          for m, x in features.items()}
        joint_probs = out_of_fold(_classifier("mlp", seed, hidden_layer_sizes, max_iter),
                                  np.concatenate(list(features.values()), axis=1))
    return unimodal_probs, joint_probs


def per_sample_interactions(modalities: dict, labels, *, seed: int = 0, **classifier_kwargs) -> dict[str, np.ndarray]:
    """
    Per-sample redundancy, uniqueness and synergy (bits) of a dataset: [`fit_pointwise_classifiers`] then
    [`pointwise_interactions`] with the empirical label prior.

    Example:
    ```python
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.integers(0, 2, 600), rng.integers(0, 2, 600)
    >>> per_sample = per_sample_interactions({"a": a, "b": b}, a ^ b, unimodal="logistic")
    >>> bool(per_sample["synergy"].mean() > per_sample["redundancy"].mean())
    True
    ```
    """
    _, label_ids = as_class_ids(labels)
    unimodal_probs, joint_probs = fit_pointwise_classifiers(modalities, label_ids, seed=seed, **classifier_kwargs)
    return pointwise_interactions(unimodal_probs, joint_probs, label_ids)


__all__ = ["fit_pointwise_classifiers", "per_sample_interactions", "pointwise_interactions"]
