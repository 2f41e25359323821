"""Calibrating the per-modality reliability on held-out data (`dmil_hf.calibration`)."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from dmil_hf import DmilConfig, DmilForMultimodalClassification
from dmil_hf.calibration import calibrate_reliability, fit_platt
from dmil_hf.configuration_dmil import CORRUPTION_INPUT

from conftest import ModelTester


def test_platt_fit_recovers_a_known_logistic():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, 20000)
    targets = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))).astype(float)
    scale, bias = fit_platt(logits, targets)
    assert scale == pytest.approx(0.5, abs=0.03) and bias == pytest.approx(-1.0, abs=0.06)
    # soft targets count as weighted positives and negatives: constant 0.8 -> a constant logit of log(4)
    scale, bias = fit_platt(np.zeros(10), np.full(10, 0.8))
    assert 1 / (1 + np.exp(-bias)) == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(ValueError, match="both working and broken"):
        fit_platt(np.ones(5), np.ones(5))


def _calibration_split(tester, n=60):
    """Encoded-like rows: alpha is clean in the first half and corrupted (level 1) in the second."""
    inputs = tester.inputs(n)
    levels = np.zeros((n, 2), dtype=np.float32)
    levels[n // 2:, 0] = 1.0
    rows = {k: v.numpy() for k, v in inputs.items()}
    rows["labels"] = tester.labels(n).numpy()
    rows[CORRUPTION_INPUT] = levels
    return Dataset.from_dict(rows).with_format("torch")


def test_calibration_shifts_the_threshold_and_travels_with_the_config(tmp_path):
    tester = ModelTester(("alpha", "beta"))
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config()).eval()
    heads = model.dmil.reliability
    assert calibrate_reliability(model, _calibration_split(tester)) is None  # never trained on corrupted rows
    heads.calibrated.fill_(1.0)
    with torch.no_grad():  # alpha's head says "broken" (logit -2) for every sample, clean or not
        heads.heads["alpha"][-1].weight.zero_()
        heads.heads["alpha"][-1].bias.fill_(-2.0)
    before = model(**tester.inputs()).modality_reliability[:, 0]
    assert before.max() < 0.2
    calibration = calibrate_reliability(model, _calibration_split(tester))
    assert set(calibration) == {"alpha"} and model.config.reliability_calibration == calibration
    # half the held-out rows are clean: a constant logit is mapped to the base rate
    after = model(**tester.inputs()).modality_reliability[:, 0]
    torch.testing.assert_close(after, torch.full_like(after, 0.5), atol=0.02, rtol=0)
    model.save_pretrained(tmp_path)
    again = DmilForMultimodalClassification.from_pretrained(tmp_path).eval()
    assert again.config.reliability_calibration == calibration
    torch.testing.assert_close(again(**tester.inputs()).modality_reliability, model(**tester.inputs()).modality_reliability)


def test_calibration_needs_corrupted_rows():
    tester = ModelTester(("alpha", "beta"))
    model = DmilForMultimodalClassification(tester.config()).eval()
    model.dmil.reliability.calibrated.fill_(1.0)
    split = _calibration_split(tester).remove_columns([CORRUPTION_INPUT])
    with pytest.raises(ValueError, match="modality_corruption"):
        calibrate_reliability(model, split)
    assert DmilConfig(feature_modalities={"a": 2, "b": 2}).reliability_calibration is None
