"""Predicting by marginalising over which modalities work (`DmilConfig.reliability_marginalization`): a modality
judged broken with probability p is missing with probability p, and the model's missing-modality path answers."""

import json

import torch

from dmil_hf import DmilConfig, DmilForMultimodalClassification

from conftest import ModelTester

def test_subset_probabilities():
    from dmil_hf.modeling_dmil import modality_subsets, subset_probabilities

    subsets = modality_subsets(2)
    assert subsets.tolist() == [[True, False], [False, True], [True, True]]
    reliability = torch.tensor([[0.5, 1.0], [0.8, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    weights = subset_probabilities(reliability, mask, subsets)
    torch.testing.assert_close(weights, torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))


def test_subset_posterior():
    from dmil_hf.modeling_dmil import subset_posterior

    prior = torch.tensor([[0.2, 0.5], [0.3, 0.0], [0.5, 0.5]]).unsqueeze(-1)  # (V=3 subsets, B=2, 1)
    probabilities = torch.tensor([[[0.9, 0.1], [0.5, 0.5]], [[0.1, 0.9], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]])
    posterior = subset_posterior(prior, probabilities, torch.tensor([0, 1])).squeeze(-1)
    # sample 0: class 0 is explained by subset 0 (0.2 * 0.9), less by subset 1 (0.3 * 0.1) and 2 (0.5 * 0.5)
    torch.testing.assert_close(posterior[:, 0], torch.tensor([0.18, 0.03, 0.25]) / 0.46)
    # sample 1: every subset predicts alike, so the posterior is the prior (a subset with prior 0 stays at 0)
    torch.testing.assert_close(posterior[:, 1], prior[:, 1, 0])


def test_subset_evidence_counts_only_what_beats_chance():
    from dmil_hf.modeling_dmil import subset_evidence, subset_posterior

    # Four classes (chance 0.25), three subsets, three samples.
    prior = torch.tensor([[0.1, 0.2, 0.5], [0.9, 0.3, 0.5], [0.0, 0.5, 0.0]]).unsqueeze(-1)
    probabilities = torch.tensor([
        [[0.85, 0.05, 0.05, 0.05], [0.55, 0.15, 0.15, 0.15], [0.25, 0.25, 0.25, 0.25]],
        [[0.25, 0.25, 0.25, 0.25], [0.40, 0.20, 0.20, 0.20], [0.10, 0.30, 0.30, 0.30]],
        [[0.25, 0.25, 0.25, 0.25], [0.10, 0.30, 0.30, 0.30], [0.25, 0.25, 0.25, 0.25]],
    ])
    predicted = torch.tensor([0, 0, 0])
    evidence = subset_evidence(prior, probabilities, predicted).squeeze(-1)
    # sample 0: a doubted subset (prior 0.1) that alone lifts class 0 above chance takes all the weight; the trusted
    # one (0.9) predicts at chance and explains nothing. Its posterior would have favoured the trusted one.
    torch.testing.assert_close(evidence[:, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert subset_posterior(prior, probabilities, predicted)[1, 0, 0] > 0.5
    # sample 1: the prior times the lift over chance (0.2 * 0.30, 0.3 * 0.15), a subset below chance gets nothing
    torch.testing.assert_close(evidence[:, 1], torch.tensor([0.06, 0.045, 0.0]) / 0.105)
    # sample 2: no subset beats chance: the posterior
    torch.testing.assert_close(evidence[:, 2], subset_posterior(prior, probabilities, predicted)[:, 2, 0])
    torch.testing.assert_close(evidence.sum(0), torch.ones(3))


def _three_feature_model(**overrides):
    tester = ModelTester(("alpha", "beta", "gamma"), batch_size=6)
    torch.manual_seed(0)
    config = tester.config(modality_dropout=0.0, **{"reliability_marginalization": True, **overrides})
    model = DmilForMultimodalClassification(config).eval()
    model.dmil.reliability.calibrated.fill_(1.0)  # as after training on corrupted rows
    return tester, model


def _force_reliability(model, logits: dict):
    with torch.no_grad():
        for name, bias in logits.items():
            model.dmil.reliability.heads[name][-1].weight.zero_()
            model.dmil.reliability.heads[name][-1].bias.fill_(bias)


def test_a_broken_modality_is_exactly_a_missing_one():
    tester, model = _three_feature_model()
    _force_reliability(model, {"alpha": -40.0, "beta": 40.0, "gamma": 40.0})
    inputs = tester.inputs()
    assert model.marginalizes_reliability
    out = model(**inputs)
    model.dmil.reliability.calibrated.zero_()  # untrained heads: every present modality fully trusted
    without = model(beta_features=inputs["beta_features"], gamma_features=inputs["gamma_features"])
    torch.testing.assert_close(out.logits, without.logits.log_softmax(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.interaction_weights, without.interaction_weights, atol=1e-5, rtol=0)


def test_an_uncertain_modality_mixes_its_presence_and_its_absence():
    tester, model = _three_feature_model()
    _force_reliability(model, {"alpha": 0.0, "beta": 40.0, "gamma": 40.0})  # alpha works with probability 0.5
    inputs = tester.inputs()
    out = model(**inputs)
    model.dmil.reliability.calibrated.zero_()
    with_alpha = model(**inputs).logits.softmax(-1)
    without = model(beta_features=inputs["beta_features"], gamma_features=inputs["gamma_features"]).logits.softmax(-1)
    torch.testing.assert_close(out.logits.exp(), 0.5 * with_alpha + 0.5 * without, atol=1e-5, rtol=0)
    # The readout mixes the two paths by their evidence for the predicted class (lift above chance), not half and half.
    predicted = out.logits.argmax(-1, keepdim=True)
    chance = 1.0 / model.config.num_labels
    lift_with = (with_alpha.gather(-1, predicted) - chance).clamp(min=0)
    lift_without = (without.gather(-1, predicted) - chance).clamp(min=0)
    assert ((lift_with + lift_without) > 0).all()  # the posterior fallback is tested above
    trusted = lift_with / (lift_with + lift_without)
    readout_with = model(**inputs).interaction_weights
    readout_without = model(beta_features=inputs["beta_features"],
                            gamma_features=inputs["gamma_features"]).interaction_weights
    torch.testing.assert_close(out.interaction_weights, trusted * readout_with + (1 - trusted) * readout_without,
                               atol=1e-5, rtol=0)
    assert not torch.allclose(trusted, torch.full_like(trusted, 0.5), atol=1e-3)  # the evidence is not the prior
    # the soft gating of earlier versions, and training, do not marginalise
    model.config.reliability_marginalization = False
    assert not model.marginalizes_reliability
    model.config.reliability_marginalization = True
    assert not model.train().marginalizes_reliability


def test_untrained_reliability_heads_leave_the_outputs_as_they_were():
    tester, model = _three_feature_model()
    model.dmil.reliability.calibrated.zero_()
    inputs = tester.inputs()
    assert model.marginalizes_reliability
    out = model(**inputs)
    model.config.reliability_marginalization = False
    soft = model(**inputs)
    torch.testing.assert_close(out.logits, soft.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.interaction_weights, soft.interaction_weights, atol=1e-6, rtol=0)


def test_on_by_default_and_off_for_configs_saved_before_the_field(tmp_path):
    config = DmilConfig(feature_modalities={"a": 3, "b": 4})
    assert config.reliability_marginalization
    config.save_pretrained(tmp_path)
    assert DmilConfig.from_pretrained(tmp_path).reliability_marginalization  # saved explicitly, kept
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["reliability_marginalization"]  # as a config written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert not DmilConfig.from_pretrained(tmp_path).reliability_marginalization
