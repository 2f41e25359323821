"""The method registry, already-built towers through the constructor, the stage presets and the stage losses."""

import pytest
import torch
from transformers import BertModel

from dmil_hf import METHODS, DmilConfig, DmilForMultimodalClassification, build_model, get_method
from dmil_hf.methods import Method, method_of, register_method
from dmil_hf.modeling_dmil import STAGE_LOSSES, describe_loss, evaluate_loss, loss_coefficients
from dmil_hf.towers import text_tower_config

from conftest import ModelTester


# --- the registry ---------------------------------------------------------------------------------------------

def test_registry_names_every_method_once_with_its_classes():
    assert list(METHODS) == ["dmil", "joint", "ensemble", "i2moe"]
    model_types = [m.model_type for m in METHODS.values()]
    assert model_types == ["dmil", "dmil_joint", "dmil_ensemble", "dmil_i2moe"]
    for method in METHODS.values():
        assert get_method(method.name) is method and get_method(method.model_type) is method
        assert method.title and method.description
    assert [m.name for m in METHODS.values() if m.staged] == ["dmil"]
    assert {m.name for m in METHODS.values() if m.interaction_weights} == {"dmil", "i2moe"}


def test_method_of_reads_the_model_type_of_a_model_or_config():
    config = ModelTester(("alpha", "beta")).config()
    for name in METHODS:
        model = build_model(name, config)
        assert method_of(model).name == name and method_of(model.config).name == name
    assert method_of(BertModel(text_tower_config("tiny", vocab_size=50))) is None


def test_registry_refuses_a_second_method_of_the_same_name_or_type():
    dmil = METHODS["dmil"]
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("dmil", "again", "", dmil.config_class, dmil.model_class))
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("dmil2", "again", "", dmil.config_class, dmil.model_class))
    assert list(METHODS) == ["dmil", "joint", "ensemble", "i2moe"]
    with pytest.raises(ValueError, match=r"method 'late' is unknown; expected one of \['dmil'"):
        get_method("late")


# --- towers given to the constructor ----------------------------------------------------------------------------

def _text_and_features(bert, **kwargs):
    return DmilConfig(text_config=bert.config, feature_modalities={"alpha": 6}, num_labels=3, hidden_size=32,
                      latent_size=16, **kwargs)


@pytest.mark.parametrize("method", list(METHODS))
def test_given_towers_are_used_as_they_are(method):
    torch.manual_seed(3)
    bert = BertModel(text_tower_config("tiny", vocab_size=50))
    reference = {k: v.clone() for k, v in bert.state_dict().items()}
    config = _text_and_features(bert)
    model = build_model(method, config, towers={"text": bert})
    tower = model.base_model.encoders.towers["text"]
    assert tower is bert and tower.pooler is None  # mean pooling: the pooler is dropped, as for built towers
    for name, value in tower.state_dict().items():
        assert torch.equal(value, reference[name]), name  # post_init did not re-initialise them


def test_given_towers_are_frozen_when_the_config_says_so():
    bert = BertModel(text_tower_config("tiny", vocab_size=50))
    config = _text_and_features(bert, freeze_towers=["text"])
    model = DmilForMultimodalClassification(config, towers={"text": bert}).train()
    assert not bert.training and not any(p.requires_grad for p in bert.parameters())


def test_a_tower_for_a_modality_without_its_config_is_refused():
    bert = BertModel(text_tower_config("tiny", vocab_size=50))
    config = ModelTester(("alpha", "beta")).config()
    with pytest.raises(ValueError, match="a tower was given for 'text', but the config has no text_config"):
        DmilForMultimodalClassification(config, towers={"text": bert})
    with pytest.raises(ValueError, match="a tower was given for 'alpha'"):
        DmilForMultimodalClassification(config, towers={"alpha": bert})
    with pytest.raises(TypeError, match="the text tower must be a torch.nn.Module"):
        DmilForMultimodalClassification(_text_and_features(bert), towers={"text": "bert-base-uncased"})


# --- stage presets and stage losses -----------------------------------------------------------------------------

def test_stages_are_objects_with_the_config_presets():
    config = DmilConfig(feature_modalities={"a": 2, "b": 3}, num_labels=2, stage1_epochs=2, stage2_epochs=0,
                        stage3_epochs=5, stage3_learning_rate=1e-3)
    assert [(s.index, s.name, s.epochs, s.learning_rate) for s in config.stages] == [
        (1, "stage1", 2, 2e-3), (2, "stage2", 0, 2e-3), (3, "stage3", 5, 1e-3)]
    assert [s.index for s in config.scheduled_stages] == [1, 3]


def _written_out_loss(terms, config, stage):
    """The stage losses as the paper's schedule states them, written out by hand (same order of operations)."""
    modalities, components = config.modalities, config.component_names
    kl_w, rec_w = config.modality_weights("level1_kl_weights"), config.modality_weights("level1_reconstruction_weights")
    unimodal = sum(terms[f"task_unimodal_{m}"] for m in modalities)
    level1 = sum(kl_w[m] * terms[f"kl_level1_{m}"] + rec_w[m] * terms[f"reconstruction_{m}"] for m in modalities)
    level2_kl = terms["kl_redundancy"] + sum(terms[f"kl_alignment_{m}"] + terms[f"kl_unique_{m}"] for m in modalities)
    rebuild = sum(terms[f"reconstruction_relevant_{m}"] for m in modalities)
    heads = sum(terms[f"task_component_{n}"] for n in components)
    readout = sum(terms[f"readout_{m}"] for m in modalities)
    if stage == 1:
        return readout + unimodal + config.lamb * level1 + config.stage1_synergy_weight * terms["task_component_synergy"]
    parsimony = config.synergy_gate_penalty * terms["gate_synergy"]
    if stage == 2:
        return (readout + parsimony + terms["task_gated"]
                + config.lamb * (level2_kl + config.stage2_reconstruction_weight * rebuild)
                + config.stage2_component_weight * heads)
    reconstruction = sum(terms[f"reconstruction_{m}"] for m in modalities) + rebuild
    return (readout + parsimony + terms["task_gated"] + config.stage3_unimodal_weight * unimodal
            + config.lamb * sum(kl_w[m] * terms[f"kl_level1_{m}"] for m in modalities)
            + config.stage3_reconstruction_weight * reconstruction
            + config.lamb * config.stage3_level2_scale * level2_kl + config.stage3_component_weight * heads)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_losses_are_the_written_out_schedule(stage):
    """The loss is one weighted sum of the stacked terms: the written-out schedule to float rounding, with the same
    gradients."""
    tester = ModelTester(("text", "vision", "alpha"), level1_kl_weights=[0.3, 1.0, 2.5])
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config()).set_training_stage(stage).train()
    out = model(labels=tester.labels(), **tester.inputs())
    expected = _written_out_loss(out.loss_terms, model.config, stage)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(evaluate_loss(STAGE_LOSSES[stage], out.loss_terms, model.config), expected, rtol=1e-6,
                               atol=1e-6)
    parameters = [p for p in model.parameters() if p.requires_grad]
    written = torch.autograd.grad(expected, parameters, retain_graph=True, allow_unused=True)
    for got, want, p in zip(torch.autograd.grad(out.loss, parameters, allow_unused=True), written, parameters,
                            strict=True):
        # The written-out schedule leaves out the terms weighted 0 (the reliability heads' without corruption).
        want = torch.zeros_like(p) if want is None else want
        torch.testing.assert_close(torch.zeros_like(p) if got is None else got, want, rtol=1e-5, atol=1e-6)


def test_loss_coefficients_weigh_each_term_as_the_schedule_does():
    config = DmilConfig(feature_modalities={"a": 2, "b": 3}, num_labels=2, lamb=0.5, level1_kl_weights=[2.0, 3.0],
                        stage3_reconstruction_weight=0.25)
    coefficients = loss_coefficients(STAGE_LOSSES[3], config)
    assert coefficients["kl_level1_a"] == 0.5 * 2.0 and coefficients["kl_level1_b"] == 0.5 * 3.0
    assert coefficients["reconstruction_relevant_b"] == 0.25 and coefficients["task_gated"] == 1.0
    assert "kl_level1_a" not in loss_coefficients(STAGE_LOSSES[2], config)


def test_the_card_formula_names_each_stage_weight():
    config = DmilConfig(feature_modalities={"a": 2, "b": 3}, num_labels=2, lamb=0.3, stage1_synergy_weight=0.0,
                        stage3_level2_scale=0.5)
    stage1 = describe_loss(STAGE_LOSSES[1], config)
    assert stage1.startswith("Σ_m CE(readout head) + Σ_m CE(unimodal head) + 0.3·") and "synergy" not in stage1
    assert "0.15·(KL(redundancy)" in describe_loss(STAGE_LOSSES[3], config)  # lamb · stage3_level2_scale
    assert "CE(synergy head)" in describe_loss(STAGE_LOSSES[1], DmilConfig(feature_modalities={"a": 2, "b": 3},
                                                                               num_labels=2))
