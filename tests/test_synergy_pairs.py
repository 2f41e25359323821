"""The synergy component built pair by pair (`synergy_structure="pairs"`): a synergy of two modalities keeps its
input when a third one is lost, each pair learns to predict alone, and configs saved before the field existed keep
the joint MLP of that time."""

import pytest
import torch
import torch.nn.functional as F

from dmil_hf import DmilConfig, DmilForMultimodalClassification
from dmil_hf.modeling_dmil import DmilPairwiseSynergy

from conftest import ModelTester


def _model(modalities=("alpha", "beta", "gamma"), **overrides):
    tester = ModelTester(modalities, batch_size=6)
    torch.manual_seed(0)
    config = tester.config(modality_dropout=0.0, **{"synergy_structure": "pairs", **overrides})
    return tester, DmilForMultimodalClassification(config).eval()


def test_a_lost_modality_leaves_the_synergy_of_the_others_unchanged():
    tester, model = _model()
    inputs = tester.inputs()
    full = model.dmil(**inputs)
    assert full.synergy_pair_embeds.shape == (6, 3, 16) and full.synergy_pair_mask.all()
    # without gamma only the pair (alpha, beta) is left: the synergy component is exactly its latent
    without = model.dmil(alpha_features=inputs["alpha_features"], beta_features=inputs["beta_features"])
    assert without.synergy_pair_mask.tolist() == [[True, False, False]] * 6
    torch.testing.assert_close(without.component_embeds[:, -1], without.synergy_pair_embeds[:, 0])
    torch.testing.assert_close(without.synergy_pair_embeds[:, 0], full.synergy_pair_embeds[:, 0])
    # with every pair present the component mixes them (it is not the first pair's latent alone)
    assert not torch.allclose(full.component_embeds[:, -1], full.synergy_pair_embeds[:, 0])


def test_with_two_modalities_pairs_is_the_joint_synergy_mlp():
    views, trust = torch.randn(5, 2, 8), torch.ones(5, 2)
    torch.manual_seed(0)
    pairs = DmilPairwiseSynergy(2, 8, 12, 4)
    joint = torch.nn.Sequential(torch.nn.Linear(24, 12), torch.nn.GELU(), torch.nn.Linear(12, 4))
    with torch.no_grad():
        for layer, grouped in ((joint[0], pairs.mlp[0]), (joint[2], pairs.mlp[2])):
            layer.weight.copy_(grouped.weight[0])
            layer.bias.copy_(grouped.bias[0])
    pooled, latents, present = pairs(views, trust)
    expected = joint(torch.cat([views[:, 0], views[:, 1], views[:, 0] * views[:, 1]], -1))
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(latents[:, 0], expected)
    assert present.all()


def test_each_pair_learns_to_predict_alone():
    """The synergy component's loss is the mean of its pooled prediction's and each present pair's cross-entropy."""
    tester, model = _model()
    model.set_training_stage(3).train()
    for dropout in model.dmil.encoders.dropouts.values():
        dropout.p = 0.0
    inputs, labels = tester.inputs(), tester.labels(6)
    torch.manual_seed(1)
    out = model(**inputs, labels=labels)
    torch.manual_seed(1)
    pairs = model.dmil(**inputs).synergy_pair_embeds
    pooled_loss = F.cross_entropy(out.component_logits[:, -1], labels, reduction="none")
    pair_loss = F.cross_entropy(model.synergy_head(pairs).flatten(0, 1), labels.repeat_interleave(3),
                                reduction="none").view(6, 3)
    expected = ((pooled_loss + pair_loss.sum(1)) / 4).mean()
    torch.testing.assert_close(out.loss_terms["task_component_synergy"], expected)


def test_joint_structure_is_the_default_and_survives_a_round_trip():
    _, model = _model(synergy_structure="joint")
    assert isinstance(model.dmil.synergy, torch.nn.Sequential)
    assert model.dmil(**ModelTester(("alpha", "beta", "gamma")).inputs()).synergy_pair_embeds is None
    assert DmilConfig().synergy_structure == "joint"
    config = DmilConfig(feature_modalities={"a": 3, "b": 4}, synergy_structure="pairs")
    assert DmilConfig.from_dict(config.to_dict()).synergy_structure == "pairs"
    with pytest.raises(ValueError, match="synergy_structure"):
        DmilConfig(synergy_structure="triples")
