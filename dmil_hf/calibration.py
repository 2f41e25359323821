"""Calibrating DMIL's per-modality reliability on held-out data.

The reliability heads (`DmilReliability`) learn from corrupted copies of the training rows. Where the training data
holds few distinct clean inputs (a handful of sentence templates, a few voices), a head also learns *which* clean
inputs it has seen, and judges clean inputs it has not seen as broken: on `digits`, clean validation sentences (new
templates) got a mean text reliability of 0.70, training ones 1.00. `calibrate_reliability` fits, per modality, a
scale and a bias for the head's logit (Platt scaling, scikit-learn's logistic regression on that one number) on a
held-out split and corrupted copies of it, made with the training kinds only (`add_training_corruption`), and stores
them in `config.reliability_calibration`: the held-out split says where the threshold between working and broken
lies for inputs the heads have not seen.
"""

from __future__ import annotations

import numpy as np
import torch

from .configuration_dmil import CORRUPTION_INPUT

# The share of the held-out rows copied with each modality corrupted for the fit (`dmil train` uses the validation
# split): enough broken samples of every modality, beside the clean rows.
CALIBRATION_FRACTION = 0.3
# Logits are read back from reliabilities in (0, 1): clip so that a saturated head gives a finite logit.
_EPS = 1e-6


def reliability_logits(model, encoded, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reliability heads' own logits `(N, M)` (without calibration), the presence mask `(N, M)` and the
    corruption levels `(N, M)` of `encoded`, an encoded split with a `modality_corruption` column."""
    if CORRUPTION_INPUT not in encoded.column_names:
        raise ValueError(f"the split has no {CORRUPTION_INPUT!r} column: make corrupted copies of it first "
                         "(dmil_hf.data.add_training_corruption).")
    saved, model.config.reliability_calibration = model.config.reliability_calibration, None
    was_training = model.training
    model.eval()
    columns = [c for c in encoded.column_names if c not in ("labels", CORRUPTION_INPUT)]
    logits, masks = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start:start + batch_size]
                out = model(**{c: batch[c] for c in columns})
                reliability = out.modality_reliability.float().clamp(_EPS, 1 - _EPS)
                logits.append(torch.logit(reliability).numpy())
                masks.append(out.modality_mask.numpy())
    finally:
        model.config.reliability_calibration = saved
        model.train(was_training)
    levels = np.asarray(encoded[CORRUPTION_INPUT], dtype=np.float64)
    return np.concatenate(logits), np.concatenate(masks), levels


def fit_platt(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """`(scale, bias)` of the logistic regression of soft `targets` in [0, 1] on one feature, `logits` (each row
    counted as a positive with weight `target` and a negative with weight `1 - target`)."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([logits, logits])[:, None]
    y = np.concatenate([np.ones_like(targets), np.zeros_like(targets)])
    weight = np.concatenate([targets, 1.0 - targets])
    keep = weight > 0
    if len(set(y[keep].tolist())) < 2:
        raise ValueError("calibration needs both working and broken samples of each modality.")
    fit = LogisticRegression(C=1e4).fit(x[keep], y[keep], sample_weight=weight[keep])
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def calibrate_reliability(model, encoded, batch_size: int = 64) -> dict:
    """Fit `config.reliability_calibration` (per modality `[scale, bias]`, see the module docstring) on `encoded`: a
    held-out split with corrupted copies of its rows and their `modality_corruption` column (e.g.
    `add_training_corruption(dsd["validation"], modalities, 0.3, seed=1)`, encoded like the training split). Sets it
    on `model.config` and returns it (modalities without both working and broken rows there are left out); a model without reliability heads, or never trained on corrupted rows, is left
    as it is (returns None)."""
    reliability = getattr(getattr(model, "dmil", None), "reliability", None)
    if reliability is None or not float(reliability.calibrated):
        return None
    logits, mask, levels = reliability_logits(model, encoded, batch_size)
    calibration = {}
    for i, modality in enumerate(model.config.modalities):
        rows = mask[:, i].astype(bool)
        targets = 1.0 - levels[rows, i]
        if (targets > 0).any() and (targets < 1).any():  # a modality never corrupted here keeps its own logits
            calibration[modality] = list(fit_platt(logits[rows, i], targets))
    model.config.reliability_calibration = calibration
    return calibration


__all__ = ["CALIBRATION_FRACTION", "calibrate_reliability", "fit_platt", "reliability_logits"]
