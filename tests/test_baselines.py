"""Baselines (joint, ensemble, I2MoE): shapes, save/load through the Auto classes, remote code, and the behaviour
each one promises (ensemble = mean of unimodal probabilities trained independently; I2MoE gate and towers-once)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import dmil_hf
from dmil_hf import (
    METHODS,
    DmilConfig,
    DmilI2moeConfig,
    DmilI2moeForMultimodalClassification,
    build_model,
)
from dmil_hf.configuration_dmil import TOWER_MODALITIES

from conftest import COMBINATIONS, ModelTester

BASELINES = ("joint", "ensemble", "i2moe")
BASELINE_COMBINATIONS = ("text+vision", "two features")


@pytest.fixture(params=BASELINE_COMBINATIONS)
def pair(request):
    return ModelTester(COMBINATIONS[request.param])


@pytest.mark.parametrize("method", BASELINES)
def test_forward_backward_shapes(method, pair):
    torch.manual_seed(0)
    model = build_model(method, pair.config())
    out = model(labels=pair.labels(), **pair.inputs())
    m, b, c = len(pair.modalities), pair.batch_size, pair.num_labels
    assert out.logits.shape == (b, c) and torch.isfinite(out.loss)
    assert out.modality_embeds.shape == (b, m, 32) and out.modality_mask.all()
    if method == "ensemble":
        assert out.unimodal_logits.shape == (b, m, c)
        assert set(out.loss_terms) == {f"task_unimodal_{x}" for x in pair.modalities}
    if method == "i2moe":
        assert out.interaction_weights.shape == (b, m + 2) and out.component_logits.shape == (b, m + 2, c)
        assert out.component_names == model.config.component_names
        assert set(out.loss_terms) == {"task", "interaction_synergy", "interaction_redundancy"} | {
            f"interaction_unique_{x}" for x in pair.modalities}
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("method", BASELINES)
def test_save_reload_through_auto_class(method, pair, tmp_path):
    model = build_model(method, pair.config()).eval()
    inputs = pair.inputs()
    with torch.no_grad():
        expected = model(**inputs)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"dmil_{method}"
    assert saved["auto_map"]["AutoModelForSequenceClassification"] == f"baselines.{type(model).__name__}"
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model) and type(reloaded.config) is type(model.config)
    with torch.no_grad():
        got = reloaded(**inputs)
    assert (got.logits - expected.logits).abs().max() <= 1e-6
    if method == "i2moe":
        assert (got.interaction_weights - expected.interaction_weights).abs().max() <= 1e-6


def test_i2moe_remote_code_loads_without_dmil_hf(tmp_path):
    tester = ModelTester(("text", "vision"), i2moe_temperature=2.0)
    model = build_model("i2moe", tester.config()).eval()
    model.save_pretrained(tmp_path / "ckpt")
    for name in ("baselines.py", "configuration_dmil.py", "modeling_dmil.py"):
        assert (tmp_path / "ckpt" / name).exists()
    inputs = tester.inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save(inputs, tmp_path / "inputs.pt")
    script = f"""
import sys
sys.modules["dmil_hf"] = None  # make the installed package unimportable
import torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True).eval()
assert type(model).__name__ == "DmilI2moeForMultimodalClassification", type(model)
assert "dmil_hf" not in type(model).__module__, type(model).__module__
assert model.config.i2moe_temperature == 2.0
inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
with torch.no_grad():
    torch.save(model(**inputs).logits, {str(tmp_path / 'out.pt')!r})
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (torch.load(tmp_path / "out.pt") - expected).abs().max() <= 1e-6


def test_baselines_file_imports_only_hub_safe_modules():
    tree = ast.parse((Path(dmil_hf.__file__).parent / "baselines.py").read_text())
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module in ("configuration_dmil", "modeling_dmil"), node.module
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            roots = [name.split(".")[0] for name in names]
            assert set(roots) <= allowed, roots


# --- ensemble ---------------------------------------------------------------------------------------------------

def test_ensemble_predicts_log_of_mean_unimodal_probabilities(pair):
    model = build_model("ensemble", pair.config()).eval()
    with torch.no_grad():
        out = model(**pair.inputs())
    torch.testing.assert_close(out.logits, out.unimodal_logits.softmax(-1).mean(1).log())
    torch.testing.assert_close(out.logits.softmax(-1), out.unimodal_logits.softmax(-1).mean(1))


MULTI_HOT = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("method", BASELINES)
def test_multi_label_task_loss_is_binary_cross_entropy(method):
    """The baselines share DMIL's label checks and task loss: multi-hot labels, BCE with logits per label."""
    tester = ModelTester(("alpha", "beta"))
    torch.manual_seed(0)
    model = build_model(method, tester.config(problem_type="multi_label_classification")).eval()
    out = model(labels=MULTI_HOT, **tester.inputs())
    per_head = {"joint": lambda: [out.logits], "i2moe": lambda: [out.logits],
                "ensemble": lambda: list(out.unimodal_logits.unbind(1))}[method]()
    task = sum(torch.nn.functional.binary_cross_entropy_with_logits(logits, MULTI_HOT) for logits in per_head)
    terms = out.loss_terms
    torch.testing.assert_close(terms["task"] if "task" in terms else sum(terms.values()), task)
    with pytest.raises(ValueError, match=r"multi-hot tensor of shape \(batch, 3\)"):
        model(labels=tester.labels(), **tester.inputs())


def test_multi_label_ensemble_predicts_the_logit_of_the_mean_label_probabilities():
    tester = ModelTester(("text", "vision"))
    model = build_model("ensemble", tester.config(problem_type="multi_label_classification")).eval()
    mask = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    with torch.no_grad():
        out = model(modality_mask=mask, **tester.inputs())
    probabilities = out.unimodal_logits.sigmoid() * mask.unsqueeze(-1)
    torch.testing.assert_close(out.logits.sigmoid(), probabilities.sum(1) / mask.sum(1, keepdim=True))


def test_ensemble_with_a_modality_absent_uses_the_present_one_only():
    tester = ModelTester(("text", "vision"))
    model = build_model("ensemble", tester.config()).eval()
    mask = torch.tensor([[True, False]] * tester.batch_size)
    with torch.no_grad():
        out = model(modality_mask=mask, **tester.inputs())
    torch.testing.assert_close(out.logits, out.unimodal_logits[:, 0].log_softmax(-1))


def test_ensemble_tower_gradients_ignore_the_other_modality():
    tester = ModelTester(("text", "vision"))
    model = build_model("ensemble", tester.config()).eval()  # eval: no dropout, so both runs are deterministic
    assert METHODS["ensemble"].max_grad_norm == 0.0

    def text_grads(inputs):
        model.zero_grad()
        model(labels=tester.labels(), **inputs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()
                if n.startswith(("encoders.towers.text.", "encoders.projections.text.", "unimodal_heads.text."))
                and p.grad is not None}

    inputs = tester.inputs()
    before = text_grads(inputs)
    inputs["vision_pixel_values"] = torch.rand_like(inputs["vision_pixel_values"]) * 5
    after = text_grads(inputs)
    assert before and before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


# --- I2MoE ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("absent", TOWER_MODALITIES)
def test_i2moe_weights_sum_to_one_and_drop_absent_components(trimodal, absent):
    model = build_model("i2moe", trimodal.config()).eval()
    inputs = {k: v for k, v in trimodal.inputs().items() if not k.startswith(f"{absent}_")}
    with torch.no_grad():
        full = model(**trimodal.inputs())
        out = model(labels=trimodal.labels(), **inputs)
    torch.testing.assert_close(full.interaction_weights.sum(-1), torch.ones(trimodal.batch_size))
    assert (full.interaction_weights > 0).all()
    weights = dict(zip(out.component_names, out.interaction_weights.T))
    # Two modalities remain: the synergy expert keeps its weight (it needs two, not all three).
    assert (weights[f"unique_{absent}"] == 0).all() and (weights["synergy"] > 0).all()
    torch.testing.assert_close(out.interaction_weights.sum(-1), torch.ones(trimodal.batch_size))
    torch.testing.assert_close(out.logits, (out.interaction_weights.unsqueeze(-1) * out.component_logits).sum(1))
    assert torch.isfinite(out.loss) and out.loss_terms[f"interaction_unique_{absent}"] == 0


def test_i2moe_runs_towers_once_per_step():
    tester = ModelTester(("text", "vision"))
    model = build_model("i2moe", tester.config())
    calls = []
    for name, tower in model.encoders.towers.items():
        tower.register_forward_hook(lambda *_, name=name: calls.append(name))
    model(labels=tester.labels(), **tester.inputs()).loss.backward()
    assert sorted(calls) == ["text", "vision"]


def test_i2moe_loss_is_task_plus_weighted_mean_interaction():
    tester = ModelTester(("alpha", "beta"), i2moe_interaction_weight=0.3)
    model = build_model("i2moe", tester.config())
    out = model(labels=tester.labels(), **tester.inputs())
    interaction = [v for k, v in out.loss_terms.items() if k.startswith("interaction_")]
    assert len(interaction) == 4
    torch.testing.assert_close(out.loss, out.loss_terms["task"] + 0.3 * torch.stack(interaction).mean())


def test_i2moe_config_validates_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="i2moe_temperature"):
        DmilI2moeConfig(feature_modalities={"a": 2, "b": 3}, i2moe_temperature=0)
    config = DmilI2moeConfig(feature_modalities={"a": 2, "b": 3}, i2moe_temperature=1.2, i2moe_interaction_weight=0.4)
    config.save_pretrained(tmp_path)
    reloaded = DmilI2moeConfig.from_pretrained(tmp_path)
    assert (reloaded.i2moe_temperature, reloaded.i2moe_interaction_weight) == (1.2, 0.4)
    assert reloaded.model_type == "dmil_i2moe"


# --- build_model ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_build_model_keeps_towers_and_settings(method):
    config = ModelTester(("text", "vision"), dropout=0.2, i2moe_temperature=1.7).config()
    model = build_model(method, config)
    config_class, model_class = METHODS[method].config_class, METHODS[method].model_class
    assert type(model) is model_class and type(model.config) is config_class
    assert model.config.model_type == config_class.model_type
    assert model.config.modalities == ("text", "vision") and model.config.num_labels == 3
    assert model.config.text_config.vocab_size == config.text_config.vocab_size
    assert model.config.vision_config.num_channels == 3 and model.config.dropout == 0.2
    assert model.config.i2moe_temperature == 1.7
    assert "auto_map" not in model.config.to_dict() or method == "dmil"


def test_build_model_rejects_unknown_method():
    config = ModelTester(("alpha", "beta")).config()
    expected = r"method 'late' is unknown; expected one of \['dmil', 'joint', 'ensemble', 'i2moe'\]"
    with pytest.raises(ValueError, match=expected):
        build_model("late", config)


def test_joint_regression():
    tester = ModelTester(("alpha", "beta"))
    config = tester.config()
    config.num_labels, config.problem_type = 1, "regression"
    model = build_model("joint", config)
    labels = torch.randn(4)
    out = model(labels=labels, **tester.inputs())
    torch.testing.assert_close(out.loss, (out.logits.squeeze(-1) - labels).pow(2).mean())


def test_build_model_converts_a_saved_dmil_config(tmp_path):
    tester = ModelTester(("text", "alpha"))
    build_model("dmil", tester.config()).save_pretrained(tmp_path)
    model = build_model("i2moe", DmilConfig.from_pretrained(tmp_path))
    assert isinstance(model, DmilI2moeForMultimodalClassification)
    assert "auto_map" not in model.config.to_dict() and model.config.feature_modalities == {"alpha": 6}
