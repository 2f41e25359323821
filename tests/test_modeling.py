"""DMIL config and model: shapes, save/load, remote code, missing modalities, pretrained towers, bad input."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, BertModel, CLIPConfig, ViTConfig

import dmil_hf
from dmil_hf import DmilConfig, DmilForMultimodalClassification, DmilModel
from dmil_hf.configuration_dmil import TOWER_MODALITIES
from dmil_hf.towers import text_tower_config

from conftest import FEATURE_DIMS, ModelTester

HUB_FILES = ("configuration_dmil.py", "modeling_dmil.py")


def test_forward_backward_shapes(tester):
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config())
    out = model(labels=tester.labels(), **tester.inputs())
    m, b, c = len(tester.modalities), tester.batch_size, tester.num_labels
    assert out.logits.shape == (b, c)
    assert out.component_logits.shape == (b, m + 2, c)
    assert out.interaction_weights.shape == (b, m + 2)
    assert out.unimodal_logits.shape == (b, m, c)
    assert out.component_embeds.shape == (b, m + 2, 16)
    torch.testing.assert_close(out.interaction_weights.sum(-1), torch.ones(b))
    assert out.component_names == ("redundancy",) + tuple(f"unique_{x}" for x in model.config.modalities) + ("synergy",)
    assert {"task_gated", "kl_redundancy", "task_component_synergy"} <= set(out.loss_terms)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:5]) and torch.isfinite(out.loss)


def test_tower_blocks_are_surfaced_for_device_maps_and_fsdp(trimodal):
    """The towers' `_no_split_modules` reach the top model (transformers only looks at direct children), limited to
    classes that occur (FSDP's transformer auto-wrap rejects a class name that is not in the model)."""
    model = DmilForMultimodalClassification(trimodal.config())
    assert set(model._no_split_modules) == {"BertEmbeddings", "BertLayer", "ViTEmbeddings", "ViTLayer",
                                            "WhisperEncoderLayer"}
    present = {type(m).__name__ for m in model.modules()}
    assert set(model._no_split_modules) <= present
    # accelerate's FSDP transformer auto-wrap (examples/accelerate/fsdp.yaml names no classes) resolves them all.
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    wrapped = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
    assert wrapped == set(model._no_split_modules)


def test_save_reload_identical_outputs(tester, tmp_path):
    model = DmilForMultimodalClassification(tester.config()).eval()
    inputs = tester.inputs()
    with torch.no_grad():
        expected = model(**inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    for loader in (DmilForMultimodalClassification, AutoModelForSequenceClassification):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert type(reloaded) is DmilForMultimodalClassification
        with torch.no_grad():
            got = reloaded(**inputs)
        assert (got.logits - expected.logits).abs().max() <= 1e-6
        assert (got.interaction_weights - expected.interaction_weights).abs().max() <= 1e-6


def test_base_model_through_automodel(tmp_path):
    tester = ModelTester(("text", "vision"))
    model = DmilModel(tester.config()).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is DmilModel
    with torch.no_grad():
        a, b = model(**tester.inputs()), reloaded(**tester.inputs())
    assert (a.component_embeds - b.component_embeds).abs().max() <= 1e-6


def test_config_json_round_trip_keeps_modality_order(tmp_path):
    config = DmilConfig(feature_modalities={"zeta": 3, "alpha": 2}, text_config=text_tower_config(), num_labels=5)
    config.save_pretrained(tmp_path)
    reloaded = DmilConfig.from_pretrained(tmp_path)
    assert reloaded.modalities == config.modalities == ("text", "alpha", "zeta")
    assert reloaded.text_config.hidden_size == 32 and reloaded.num_labels == 5
    assert DmilConfig(feature_modalities={"a": 2, "b": 3}, text_config=text_tower_config().to_dict()).text_config.vocab_size == 1000


def test_remote_code_loads_without_dmil_hf(tmp_path):
    tester = ModelTester(("text", "vision"))
    model = DmilForMultimodalClassification(tester.config()).eval()
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForSequenceClassification"].endswith("DmilForMultimodalClassification")
    for name in HUB_FILES:
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
assert "dmil_hf" not in type(model).__module__, type(model).__module__
inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
with torch.no_grad():
    torch.save(model(**inputs).logits, {str(tmp_path / 'out.pt')!r})
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (torch.load(tmp_path / "out.pt") - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("name", HUB_FILES + ("processing_dmil.py",))
def test_hub_files_import_only_allowed_modules(name):
    path = Path(dmil_hf.__file__).parent / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "numpy"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: must be a sibling Hub file
                assert f"{node.module}.py" in HUB_FILES + ("processing_dmil.py",), node.module
                continue
            roots = [node.module.split(".")[0]]
        else:
            continue
        assert set(roots) <= allowed, f"{name} imports {roots}"


@pytest.mark.parametrize("absent", TOWER_MODALITIES)
def test_missing_modality_each(trimodal, absent):
    model = DmilForMultimodalClassification(trimodal.config()).eval()
    inputs = {k: v for k, v in trimodal.inputs().items() if not k.startswith(f"{absent}_")}
    with torch.no_grad():
        out = model(**inputs)
    names = model.config.component_names
    weights = dict(zip(names, out.interaction_weights[0].tolist()))
    gate = dict(zip(names, out.gate_weights[0].tolist()))
    assert weights[f"unique_{absent}"] == 0.0 and gate[f"unique_{absent}"] == 0.0
    # Two of the three modalities remain: their synergy is still a component the gate can use.
    assert gate["synergy"] > 0.0
    assert abs(sum(weights.values()) - 1) < 1e-6 and torch.isfinite(out.logits).all()


def test_synergy_needs_two_modalities():
    tester = ModelTester(("text", "vision"))
    model = DmilForMultimodalClassification(tester.config()).eval()
    inputs = {k: v for k, v in tester.inputs().items() if k.startswith("text_")}
    with torch.no_grad():
        out = model(**inputs)
    assert bool((out.gate_weights[:, -1] == 0).all()) and bool((out.interaction_weights[:, -1] == 0).all())


def test_missing_modality_per_sample_mask(trimodal):
    model = DmilForMultimodalClassification(trimodal.config()).eval()
    mask = torch.ones(trimodal.batch_size, 3, dtype=torch.bool)
    mask[1, 2] = False  # sample 1 has no audio
    with torch.no_grad():
        full = model(**trimodal.inputs())
        masked = model(modality_mask=mask, **trimodal.inputs())
    assert masked.interaction_weights[1, 3] == 0 and masked.gate_weights[1, 3] == 0
    assert masked.gate_weights[1, 4] > 0  # text and vision remain: their synergy stays available
    torch.testing.assert_close(masked.logits[0], full.logits[0])
    assert not torch.allclose(masked.logits[1], full.logits[1])


def test_regression_problem_type():
    tester = ModelTester(("alpha", "beta"))
    config = tester.config()
    config.num_labels, config.problem_type = 1, "regression"
    model = DmilForMultimodalClassification(config)
    out = model(labels=torch.randn(4), **tester.inputs())
    assert out.logits.shape == (4, 1) and out.loss.requires_grad


def test_multi_label_loss_is_binary_cross_entropy_on_every_head():
    """problem_type="multi_label_classification": multi-hot labels, every head's task loss the mean over labels of
    BCE with logits (the gated prediction, the unimodal, readout and component heads alike)."""
    tester = ModelTester(("text", "alpha"))
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config(problem_type="multi_label_classification"))
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    model(labels=labels, **tester.inputs()).loss.backward()
    model.eval()  # no modality dropout: every head learns from every sample
    out = model(labels=labels, **tester.inputs())
    assert out.logits.shape == (4, 3) and torch.isfinite(out.loss)

    def bce(logits):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)

    torch.testing.assert_close(out.loss_terms["task_gated"], bce(out.logits))
    torch.testing.assert_close(out.loss_terms["task_unimodal_alpha"], bce(out.unimodal_logits[:, 1]))
    torch.testing.assert_close(out.loss_terms["task_component_synergy"], bce(out.component_logits[:, -1]))
    # Integer multi-hot labels are accepted as well.
    again = model(labels=labels.long(), **tester.inputs())
    assert torch.isfinite(again.loss)


def test_error_multi_label_labels_of_the_wrong_shape_or_values():
    tester = ModelTester(("alpha", "beta"))
    model = DmilForMultimodalClassification(tester.config(problem_type="multi_label_classification"))
    expected = (r"labels must be a multi-hot tensor of shape \(batch, 3\) for problem_type="
                r"'multi_label_classification' \(one 0/1 entry per label\); got torch.float32 \(4, 2\)")
    with pytest.raises(ValueError, match=expected):
        model(labels=torch.zeros(4, 2), **tester.inputs())
    with pytest.raises(ValueError, match=r"shape \(batch, 3\).*got torch.int64 \(4,\)"):
        model(labels=torch.zeros(4, dtype=torch.long), **tester.inputs())
    with pytest.raises(ValueError, match=r"multi-hot labels must lie in \[0, 1\]; got values from 0.0 to 2.0"):
        model(labels=torch.tensor([[0.0, 2.0, 1.0]] * 4), **tester.inputs())
    # A single-label model given multi-hot labels says how to train multi-label.
    single = DmilForMultimodalClassification(tester.config())
    with pytest.raises(ValueError, match="For multi-hot labels .* set problem_type='multi_label_classification'"):
        single(labels=torch.zeros(4, 3), **tester.inputs())


@pytest.mark.parametrize("method", ["dmil", "joint", "i2moe"])
def test_from_pretrained_on_a_new_label_set(method, tmp_path):
    """Fine-tuning a trained model on another label set: `from_pretrained(path, num_labels=K,
    ignore_mismatched_sizes=True)` starts every label-sized tensor (the heads, DMIL's label prior) anew and keeps every
    other one; without `ignore_mismatched_sizes` it refuses."""
    tester = ModelTester(("text", "alpha"))
    torch.manual_seed(0)
    model = dmil_hf.build_model(method, tester.config())
    model.train()
    model(labels=tester.labels(), **tester.inputs())  # DMIL's label prior counts these
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    new = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    old, fresh = model.state_dict(), new.state_dict()
    assert set(old) == set(fresh)
    resized = {name for name in old if old[name].shape != fresh[name].shape}
    assert resized and all(3 in old[name].shape and 5 in fresh[name].shape for name in resized)
    for name in set(old) - resized:
        torch.testing.assert_close(fresh[name], old[name], rtol=0, atol=0, msg=name)
    if method == "dmil":
        assert {"label_prior.counts", "synergy_head.weight", "unimodal_heads.weight"} <= resized
        assert fresh["label_prior.counts"].tolist() == [0.0] * 5
    new.eval()
    with torch.no_grad():
        assert new(**tester.inputs()).logits.shape == (tester.batch_size, 5)
    labels = torch.arange(tester.batch_size) % 5
    assert torch.isfinite(new.train()(labels=labels, **tester.inputs()).loss)


def test_training_stage_changes_prediction_rule():
    tester = ModelTester(("alpha", "beta"))
    model = DmilForMultimodalClassification(tester.config()).eval()
    model.set_training_stage(1)
    out = model(**tester.inputs())
    torch.testing.assert_close(out.logits, out.unimodal_logits.mean(1))
    model.set_training_stage(3)
    out = model(**tester.inputs())
    torch.testing.assert_close(out.logits, (out.gate_weights.unsqueeze(-1) * out.component_logits).sum(1))


def test_from_encoders_pretrained_keeps_tower_bit_identical(tmp_path):
    torch.manual_seed(1)
    bert = BertModel(text_tower_config("tiny", vocab_size=50))
    bert.save_pretrained(tmp_path / "bert")
    vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=16,
                    patch_size=8)
    from transformers import ViTModel
    ViTModel(vit).save_pretrained(tmp_path / "vit")
    model = DmilForMultimodalClassification.from_encoders_pretrained(
        text=str(tmp_path / "bert"), vision=str(tmp_path / "vit"), num_labels=4, vision_add_pooling_layer=False)
    tower = model.dmil.encoders.towers["text"]
    reference = BertModel.from_pretrained(tmp_path / "bert")
    for (name, p), (_, q) in zip(tower.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name
    assert model.dmil.encoders.towers["vision"].pooler is None  # prefixed kwargs reached the tower
    assert model.config.num_labels == 4 and model.config.modalities == ("text", "vision")



@pytest.mark.parametrize("build", ["towers", "from_encoders_pretrained"])
def test_pretrained_tower_reads_the_attention_mask_before_and_after_save(tmp_path, build):
    """A tower built with `from_pretrained` keeps its attention implementation inside the DMIL model: it reads the
    attention mask, so padding changes nothing, and the model gives what its saved and reloaded copy gives. (The
    config used to reset the tower's implementation to None, for which transformers builds no mask: a trained run's
    own test report and `dmil evaluate` of the same model then differed, issue 21.)"""
    torch.manual_seed(1)
    BertModel(text_tower_config("tiny", vocab_size=50)).save_pretrained(tmp_path / "bert")
    head = dict(feature_modalities={"alpha": 6}, num_labels=3, hidden_size=32, latent_size=16)
    if build == "towers":  # as `dmil train --text-model` builds it
        tower = BertModel.from_pretrained(tmp_path / "bert")
        model = DmilForMultimodalClassification(DmilConfig(text_config=tower.config, **head), towers={"text": tower})
    else:
        model = DmilForMultimodalClassification.from_encoders_pretrained(text=str(tmp_path / "bert"), **head)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids, alpha = torch.randint(5, 50, (4, 6), generator=g), torch.randn(4, 6, generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    padded = {"text_input_ids": torch.cat([ids, torch.zeros(4, 5, dtype=ids.dtype)], 1),
              "text_attention_mask": torch.cat([mask, torch.zeros(4, 5, dtype=mask.dtype)], 1), "alpha_features": alpha}
    with torch.no_grad():
        expected = model(text_input_ids=ids, text_attention_mask=mask, alpha_features=alpha).logits
        assert (model(**padded).logits - expected).abs().max() <= 1e-5
        model.save_pretrained(tmp_path / "dmil")
        reloaded = DmilForMultimodalClassification.from_pretrained(tmp_path / "dmil").eval()
        assert (reloaded(**padded).logits - expected).abs().max() <= 1e-5


# --- bad input: one test each -----------------------------------------------------------------------------------

@pytest.fixture
def bimodal():
    tester = ModelTester(("text", "vision"))
    return tester, DmilForMultimodalClassification(tester.config())


def test_error_unknown_modality_prefix(bimodal):
    tester, model = bimodal
    with pytest.raises(ValueError, match="Unknown input 'audio_input_values'"):
        model(audio_input_values=torch.randn(4, 100), **tester.inputs())


def test_error_no_modality(bimodal):
    _, model = bimodal
    with pytest.raises(ValueError, match="No modality was given"):
        model(labels=torch.zeros(2, dtype=torch.long))


def test_error_batch_sizes_disagree(bimodal):
    tester, model = bimodal
    inputs = tester.inputs()
    inputs["vision_pixel_values"] = inputs["vision_pixel_values"][:2]
    with pytest.raises(ValueError, match="disagree on the batch size"):
        model(**inputs)


def test_error_wrong_rank(bimodal):
    tester, model = bimodal
    inputs = tester.inputs()
    inputs["vision_pixel_values"] = inputs["vision_pixel_values"][:, 0]
    with pytest.raises(ValueError, match="vision_pixel_values has rank 3"):
        model(**inputs)


def test_error_wrong_feature_width():
    tester = ModelTester(("alpha", "beta"))
    model = DmilForMultimodalClassification(tester.config())
    inputs = tester.inputs()
    inputs["alpha_features"] = torch.randn(4, FEATURE_DIMS["alpha"] + 1)
    with pytest.raises(ValueError, match=r"alpha_features has shape \(4, 7\); expected \(batch, 6\)"):
        model(**inputs)


def test_error_labels_out_of_range(bimodal):
    tester, model = bimodal
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        model(labels=torch.tensor([0, 1, 2, 3]), **tester.inputs())


def test_error_non_finite_input(bimodal):
    tester, model = bimodal
    inputs = tester.inputs()
    inputs["vision_pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="vision_pixel_values holds NaN"):
        model(**inputs)


def test_error_config_with_one_modality():
    with pytest.raises(ValueError, match="at least two modalities"):
        DmilConfig(text_config=text_tower_config())


def test_error_unsupported_sub_config():
    with pytest.raises(TypeError, match="vision_config"):
        DmilConfig(vision_config=text_tower_config(), feature_modalities={"a": 3})
    with pytest.raises(TypeError, match="text_config"):
        DmilConfig(text_config=CLIPConfig(), feature_modalities={"a": 3})
    with pytest.raises(TypeError, match="audio_config"):
        DmilConfig(audio_config=3, feature_modalities={"a": 3, "b": 2})


# --- bad input found by issue 13: each error names the input and what was expected --------------------------------

def test_error_uint8_pixel_values(bimodal):
    tester, model = bimodal
    inputs = tester.inputs()
    inputs["vision_pixel_values"] = (inputs["vision_pixel_values"] * 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"vision_pixel_values has dtype torch.uint8 .*expected the image processor's "
                                        r"float output"):
        model(**inputs)


def test_error_huge_pixel_values_instead_of_nan_logits(bimodal):
    tester, model = bimodal
    inputs = tester.inputs()
    inputs["vision_pixel_values"] = inputs["vision_pixel_values"] * 1e30
    with pytest.raises(ValueError, match=r"vision_pixel_values holds values of magnitude up to 1e\+30; expected "
                                         r"normalised inputs of magnitude at most 1e\+06"):
        model(**inputs)
    # The bound is where the towers are still finite, and the check can be switched off (it reads tensor values).
    inputs["vision_pixel_values"] = tester.inputs()["vision_pixel_values"] * 1e6
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
    model.config.check_input_values = False
    inputs["vision_pixel_values"] = tester.inputs()["vision_pixel_values"] * 1e30
    with torch.no_grad():
        model(**inputs)  # no check, no error (the logits are NaN: what the check prevents)


def test_error_attention_mask_length_differs_from_input_ids(bimodal):
    tester, model = bimodal
    inputs = tester.inputs()
    inputs["text_attention_mask"] = inputs["text_attention_mask"][:, :-2]
    with pytest.raises(ValueError, match=r"text_attention_mask has shape \(4, 5\); expected \(4, 7\), the shape of "
                                         r"text_input_ids"):
        model(**inputs)


def test_error_feature_attention_mask_shape():
    tester = ModelTester(("alpha", "beta"))
    model = DmilForMultimodalClassification(tester.config())
    inputs = tester.inputs()
    inputs["alpha_features"] = torch.randn(4, 5, FEATURE_DIMS["alpha"])
    inputs["alpha_attention_mask"] = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"alpha_attention_mask has shape \(4, 4\); expected \(4, 5\)"):
        model(**inputs)


def test_num_labels_one_without_problem_type_is_regression():
    """As in transformers: num_labels=1 and no problem_type means regression. Integer labels there are refused
    (they are almost always a binary task that wanted num_labels=2); float labels give the squared error."""
    tester = ModelTester(("alpha", "beta"))
    config = tester.config()
    config.num_labels = 1
    assert config.problem_type is None
    model = DmilForMultimodalClassification(config).eval()
    with pytest.raises(ValueError, match=r"labels are integers \(torch.int64\) but num_labels=1 without problem_type "
                                         r"means regression.*use num_labels=2"):
        model(labels=torch.zeros(4, dtype=torch.long), **tester.inputs())
    targets = torch.randn(4)
    out = model(labels=targets, **tester.inputs())
    gated = (out.gate_weights.unsqueeze(-1) * out.component_logits).sum(1).squeeze(-1)
    torch.testing.assert_close(out.loss_terms["task_gated"], (gated - targets).pow(2).mean())


def test_error_misspelt_config_keyword(tmp_path):
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) 'latnt_size' \(did you mean 'latent_size'\?\)"):
        DmilConfig(latnt_size=8, feature_modalities={"a": 2, "b": 3})
    # Standard PretrainedConfig keywords still pass, and so does a saved config with an attribute set by hand.
    config = DmilConfig(feature_modalities={"a": 2, "b": 3}, use_cache=False, problem_type="regression", num_labels=1,
                        output_hidden_states=True, id2label={0: "score"}, pad_token_id=0)
    config.note = "set by hand"
    config.save_pretrained(tmp_path)
    assert DmilConfig.from_pretrained(tmp_path).note == "set by hand"


def test_error_labels_batch_size_differs(bimodal):
    tester, model = bimodal
    with pytest.raises(ValueError, match=r"labels has batch size 3 .*the inputs have 4 \(text_input_ids has shape "
                                         r"\(4, 7\)\)"):
        model(labels=torch.zeros(3, dtype=torch.long), **tester.inputs())


def test_error_num_labels_zero():
    with pytest.raises(ValueError, match=r"`num_labels` is 0; expected a positive integer"):
        DmilConfig(num_labels=0, feature_modalities={"a": 2, "b": 3})
    config = ModelTester(("alpha", "beta")).config()
    config.num_labels = 0  # set after construction: the model refuses before building anything
    with pytest.raises(ValueError, match=r"`num_labels` is 0; expected a positive integer"):
        DmilForMultimodalClassification(config)


def test_float64_features_are_cast_to_the_model_dtype():
    tester = ModelTester(("alpha", "beta"))
    model = DmilForMultimodalClassification(tester.config()).eval()
    inputs = tester.inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
        got = model(**{k: v.double() for k, v in inputs.items()}).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


@pytest.fixture
def saved_checkpoint(tmp_path):
    tester = ModelTester(("alpha", "beta"))
    DmilForMultimodalClassification(tester.config()).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_error_from_pretrained_folder_without_config(tmp_path, saved_checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match=rf"No config.json in '{empty}' \(it holds nothing\); expected a folder written "
                                      "by save_pretrained"):
        DmilForMultimodalClassification.from_pretrained(empty)
    (saved_checkpoint / "config.json").unlink()
    with pytest.raises(OSError, match=rf"No config.json in '{saved_checkpoint}' \(it holds \[.*'model.safetensors'"):
        DmilForMultimodalClassification.from_pretrained(saved_checkpoint)


def test_error_from_pretrained_nonexistent_folder(tmp_path):
    missing = tmp_path / "no_such_run"
    for path in (missing, str(missing), "./runs/not/there"):
        with pytest.raises(OSError, match=r"No folder at '.*'; expected a local folder written by save_pretrained"):
            DmilForMultimodalClassification.from_pretrained(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_error_from_pretrained_broken_safetensors(saved_checkpoint, damage):
    weights = saved_checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file" * 50,
                         "empty": b""}[damage])
    for loader in (DmilForMultimodalClassification, AutoModelForSequenceClassification):
        with pytest.raises(OSError, match=rf"The weights file '{weights}' is .*save or download the checkpoint again"):
            loader.from_pretrained(saved_checkpoint)
