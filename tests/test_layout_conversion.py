"""The stacked head (issue 20): checkpoints of the per-modality layout load through transformers' conversion mapping
and compute what the code of that layout computed; save -> reload of the new layout is exact; the conversion reverses
for `save_original_format=True`; every new parameter is initialised by `_init_weights`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification

import dmil_hf
from dmil_hf import DmilForMultimodalClassification, DmilModel
from dmil_hf.loading import check_complete, load_model
from dmil_hf.modeling_dmil import DmilGroupedLinear

from conftest import ModelTester

FIXTURES = Path(__file__).parent / "fixtures" / "dmil_v1_layout"
VARIANTS = sorted(p.name for p in FIXTURES.iterdir())
HUB_FILES = ("configuration_dmil.py", "modeling_dmil.py")


def _expected(name):
    tensors = load_file(str(FIXTURES / name / "expected.safetensors"))
    inputs = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
    return inputs, tensors


def _old_layout(state: dict, config) -> dict:
    """The per-modality layout's state dict of a model with stacked heads, by key names alone."""
    names, old = list(config.modalities), {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if head.endswith("synergy_head"):
            old[f"{head[:-len('synergy_head')]}component_heads.{len(names) + 1}.{leaf}"] = value
            continue
        module = head.split(".")[-1] if head.split(".")[-1] not in ("0", "2", "proj") else head.split(".")[-2]
        if module in ("relevant", "irrelevant", "reconstruct", "redundancy_from", "unique", "reconstruct_relevant",
                      "unimodal_heads", "modality_heads", "component_heads") and ".towers." not in key:
            before, _, after = key.partition(f"{module}.")
            groups = [str(k) for k in range(len(names) + 1)] if module == "component_heads" else names
            for group, part in zip(groups, value.unbind(0), strict=True):
                old[f"{before}{module}.{group}.{after}"] = part.clone()
        else:
            old[key] = value
    return old


@pytest.mark.parametrize("name", VARIANTS)
def test_per_modality_checkpoint_computes_what_its_code_computed(name):
    """The fixture was saved, with its outputs, losses and gradients, by the code of the per-modality layout
    (tests/scripts/make_layout_fixture.py)."""
    model, info = DmilForMultimodalClassification.from_pretrained(FIXTURES / name, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected, mismatched or failed to convert
    if name == "text_two_features":
        assert model.config.modalities == ("text", "alpha", "beta")  # not the checkpoint keys' (sorted) order
    inputs, expected = _expected(name)
    old_names = set(load_file(str(FIXTURES / name / "model.safetensors")))
    for stage in (1, 2, 3):
        model.config.training_stage = stage
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        out.loss.backward()
        torch.testing.assert_close(out.loss, expected[f"stage{stage}.loss"], rtol=0, atol=1e-6)
        torch.testing.assert_close(out.logits, expected[f"stage{stage}.logits"], rtol=0, atol=1e-6)
        corruption = inputs.get("modality_corruption")
        if stage > 1 and corruption is not None and bool((corruption > 0).any()):
            # Since the fixture was written, a sample with a corrupted modality trains the gate but not the components'
            # predictions (their logits are detached in its gated loss): the values above are unchanged, the
            # gradients of stages 2 and 3 differ by design (the stacked layout matched them before that change).
            continue
        grads = {f"stage{stage}.grad.{k}": v for k, v in _old_layout(
            {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()},
            model.config).items()}
        recorded = {k: v for k, v in expected.items() if k.startswith(f"stage{stage}.grad.")}
        assert recorded and set(recorded) <= set(grads)
        for key, value in recorded.items():
            torch.testing.assert_close(grads[key], value, rtol=1e-5, atol=1e-6, msg=key)
        # A parameter without a recorded gradient got none then and gets none (or zeros) now.
        for key in set(grads) - set(recorded):
            if key.removeprefix(f"stage{stage}.grad.") in old_names:
                assert not grads[key].any(), key
    for field in ("interaction_weights", "gate_weights", "component_logits", "unimodal_logits", "modality_logits",
                  "component_embeds", "modality_embeds", "modality_reliability"):
        torch.testing.assert_close(getattr(out, field), expected[f"output.{field}"], rtol=0, atol=1e-6, msg=field)
    terms = {k.removeprefix("term."): v for k, v in expected.items() if k.startswith("term.")}
    assert set(out.loss_terms) == set(terms)  # the same names
    for key, value in terms.items():
        torch.testing.assert_close(out.loss_terms[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", VARIANTS)
def test_converted_checkpoint_saves_the_new_layout_and_reloads_exactly(name, tmp_path):
    model = DmilForMultimodalClassification.from_pretrained(FIXTURES / name)
    model.save_pretrained(tmp_path / "new")
    saved = load_file(str(tmp_path / "new" / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in state)
    assert "dmil.relevant.proj.weight" in saved and "synergy_head.weight" in saved
    reloaded, info = DmilForMultimodalClassification.from_pretrained(tmp_path / "new", output_loading_info=True)
    assert not any(info.values()), info
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())
    inputs, expected = _expected(name)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).loss, expected["stage3.loss"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_save_original_format_writes_the_per_modality_layout(name, tmp_path):
    """The conversion reverses: `save_original_format=True` writes exactly the per-modality checkpoint again."""
    model = DmilForMultimodalClassification.from_pretrained(FIXTURES / name)
    model.save_pretrained(tmp_path / "old", save_original_format=True)
    original = load_file(str(FIXTURES / name / "model.safetensors"))
    written = load_file(str(tmp_path / "old" / "model.safetensors"))
    assert set(written) == set(original)
    for key, value in original.items():
        assert torch.equal(written[key], value), key


@pytest.mark.parametrize("modalities", [("text", "alpha", "beta"), ("vision", "audio"), ("alpha", "beta")])
def test_per_modality_state_dict_of_any_model_converts_back(modalities, tmp_path):
    """A per-modality checkpoint built by key names from a model of any modality mix (towers first: their config
    order is not the keys' alphabetical order) loads into the same parameters, for the classifier and the base model."""
    tester = ModelTester(modalities)
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config()).eval()
    model.save_pretrained(tmp_path / "new")
    state = model.state_dict()
    save_file(_old_layout(state, model.config), str(tmp_path / "new" / "model.safetensors"), metadata={"format": "pt"})
    check_complete(model, tmp_path / "new")  # the old names count as the new parameters they fill
    reloaded = load_model(tmp_path / "new")
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())
    base, info = DmilModel.from_pretrained(tmp_path / "new", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(torch.equal(v, state[f"dmil.{k}"]) for k, v in base.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**tester.inputs()).logits, model(**tester.inputs()).logits, rtol=0, atol=0)


def test_checkpoint_of_other_modalities_is_refused(tmp_path, caplog, capfd):
    """A per-modality checkpoint whose modalities differ from its config cannot be stacked: transformers refuses it,
    naming the conversion error, rather than loading something else."""
    model = DmilForMultimodalClassification(ModelTester(("alpha", "beta")).config())
    model.save_pretrained(tmp_path)
    old = _old_layout(model.state_dict(), model.config)
    save_file({k.replace(".beta.", ".gamma.") if "relevant" in k else k: v for k, v in old.items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="conversion"):
        DmilForMultimodalClassification.from_pretrained(tmp_path)
    report = caplog.text + "".join(capfd.readouterr())
    assert "holds 'relevant.{}.proj.weight' for ['alpha', 'gamma']; this model's config expects ['alpha', 'beta']" in (
        report)


def test_per_modality_checkpoint_loads_with_remote_code(tmp_path):
    """`trust_remote_code` with this version's hub files (as an updated Hub repo would have them) converts a
    per-modality checkpoint too: the registration lives in modeling_dmil.py itself."""
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "two_features", folder)
    for name in HUB_FILES:
        shutil.copy(Path(dmil_hf.__file__).parent / name, folder / name)
    inputs, expected = _expected("two_features")
    torch.save({"inputs": inputs, "loss": expected["stage3.loss"]}, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["dmil_hf"] = None  # make the installed package unimportable
import torch
from transformers import AutoModelForSequenceClassification
model, info = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True,
                                                                  output_loading_info=True)
assert "dmil_hf" not in type(model).__module__, type(model).__module__
assert not any(info.values()), info
data = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    loss = model(**data["inputs"]).loss
assert (loss - data["loss"]).abs() <= 1e-6, (loss, data["loss"])
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_automodel_loads_the_per_modality_checkpoint():
    model = AutoModelForSequenceClassification.from_pretrained(FIXTURES / "two_features")
    assert type(model) is DmilForMultimodalClassification
    base = AutoModel.from_pretrained(FIXTURES / "two_features")
    assert type(base) is DmilModel
    assert torch.equal(base.relevant.proj.weight, model.dmil.relevant.proj.weight)


def test_init_weights_initialises_every_stacked_parameter():
    """transformers' convention: `_init_weights` sets every parameter of DMIL's own modules (here from NaN)."""
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(ModelTester(("alpha", "beta")).config())
    grouped = [m for m in model.modules() if isinstance(m, DmilGroupedLinear)]
    assert len(grouped) == 12
    with torch.no_grad():
        for module in grouped:
            module.weight.fill_(float("nan"))
            module.bias.fill_(float("nan"))
    for module in grouped:
        model._init_weights(module)
        bound = 1 / module.in_features ** 0.5
        for param in (module.weight, module.bias):
            assert torch.isfinite(param).all() and param.abs().max() <= bound
            assert param.std() > bound / 4  # each group drawn, not zeros or one constant
    # Seeded: the same seed builds the same model.
    torch.manual_seed(0)
    again = DmilForMultimodalClassification(ModelTester(("alpha", "beta")).config())
    torch.manual_seed(0)
    once_more = DmilForMultimodalClassification(ModelTester(("alpha", "beta")).config())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), once_more.state_dict().values()))


def test_fixture_is_small():
    size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert size < 200_000, size
    config = json.loads((FIXTURES / "two_features" / "config.json").read_text())
    assert config["feature_modalities"] == {"alpha": 5, "beta": 3}
