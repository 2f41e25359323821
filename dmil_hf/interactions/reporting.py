"""Scores per interaction type for `transformers.Trainer`, and a plot of per-sample interaction estimates."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _per_kind(name: str, values: np.ndarray, kinds: np.ndarray | None) -> dict[str, float]:
    scores = {name: float(values.mean())}
    if kinds is not None:
        scores.update({f"{name}_{kind}": float(values[kinds == kind].mean()) for kind in np.unique(kinds)})
    return scores


def make_compute_metrics(interactions: Sequence[str] | None = None, component_names: Sequence[str] | None = None):
    """
    A `compute_metrics` for `transformers.Trainer`: accuracy overall and per ground-truth interaction type.

    Args:
        interactions (`Sequence[str]`, *optional*): the evaluation set's interaction type of each row, in row order
            (e.g. `eval_dataset["interaction"]`); adds `accuracy_<type>` for each type.
        component_names (`Sequence[str]`, *optional*): names of the per-sample interaction weights (e.g.
            `model.config.component_names`). When the predictions hold an array of shape `(N, len(component_names))`
            after the logits (DMIL's `interaction_weights`), adds the mean weight of each component, `weight_<name>`,
            and per type, `weight_<name>_<type>`.

    Returns:
        `compute_metrics(eval_pred) -> dict[str, float]`. `eval_pred.predictions` is the logits `(N, C)` or a tuple
        whose first item is; logits of shape `(N, 1)` or `(N,)` are a regression, scored by `mse` (and
        `mse_<type>`) instead of accuracy. Multi-hot labels `(N, C)` (multi-label classification, each label
        predicted present where its logit is positive) are scored by `accuracy`, the share of samples whose whole label
        set is right (exact match), and `f1_micro` over every (sample, label) decision.
    """
    kinds = None if interactions is None else np.asarray(list(interactions))
    names = None if component_names is None else tuple(component_names)

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred[0], eval_pred[1]
        outputs = predictions if isinstance(predictions, (tuple, list)) else (predictions,)
        logits = np.asarray(outputs[0])
        labels = np.asarray(labels[0] if isinstance(labels, (tuple, list)) else labels)
        if kinds is not None and len(kinds) != len(labels):
            raise ValueError(f"`interactions` has {len(kinds)} rows but the evaluation set has {len(labels)}; pass the "
                             "interaction column of the same evaluation set, in the same order.")
        if labels.ndim == 2 and labels.shape == logits.shape and logits.shape[-1] > 1:  # multi-label
            predicted, truth = logits > 0, labels > 0.5
            scores = _per_kind("accuracy", (predicted == truth).all(-1).astype(np.float64), kinds)
            hits = float((predicted & truth).sum())
            scores["f1_micro"] = 2 * hits / max(float(predicted.sum() + truth.sum()), 1.0)
        elif logits.ndim == 1 or logits.shape[-1] == 1:
            scores = _per_kind("mse", (logits.reshape(-1) - labels.reshape(-1)) ** 2, kinds)
        else:
            scores = _per_kind("accuracy", (logits.argmax(-1) == labels).astype(np.float64), kinds)
        if names is not None:
            weights = [np.asarray(o) for o in outputs[1:] if np.shape(o) == (len(labels), len(names))]
            for k, name in enumerate(names if weights else ()):
                scores.update(_per_kind(f"weight_{name}", weights[0][:, k], kinds))
        return scores

    return compute_metrics


def plot_per_sample(per_sample: dict[str, np.ndarray], groups: Sequence[str] | None = None, path="per_sample.png",
                    title: str = "Per-sample interaction estimates") -> Path:
    """
    Save a PNG of the distribution of each per-sample component (box plots, in bits), one panel per ground-truth
    group when `groups` (one label per sample) is given.

    Args:
        per_sample (`dict[str, np.ndarray]`): e.g. the output of [`per_sample_interactions`]; only its components
            (`redundancy`, `unique_*`, `synergy`) are drawn when it has them, otherwise every entry.
        groups (`Sequence[str]`, *optional*): ground-truth interaction type of each sample.
        path (`str` or `Path`): where to write the PNG.
    """
    from ..plots import plot_component_boxes

    components = [k for k in per_sample if k in ("redundancy", "synergy") or k.startswith("unique_")]
    components = components or list(per_sample)
    values = np.stack([np.asarray(per_sample[k], dtype=np.float64) for k in components], axis=1)
    groups = np.full(len(values), "all") if groups is None else np.asarray(list(groups))
    if len(groups) != len(values):
        raise ValueError(f"`groups` has {len(groups)} entries but `per_sample` has {len(values)} rows.")
    return plot_component_boxes(values, groups, components, path, title, "bits")


__all__ = ["make_compute_metrics", "plot_per_sample"]
