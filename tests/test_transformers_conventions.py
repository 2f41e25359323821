"""
The conventions transformers' generic model tests (`ModelTesterMixin`, `ConfigTester`) and a plain `Trainer` rely on,
checked on DMIL and the baselines with the tiny-config `ModelTester` of conftest (written for this package, not copied
from transformers):

- `return_dict=False` (argument or `config.return_dict`) gives the tuple of the output's non-None fields;
- `outputs[0]` is the main tensor (component embeddings for `DmilModel`; loss, else logits, for the classifiers);
- `output_hidden_states` / `output_attentions` return each tower's own output as `<modality>_model_output` (CLIP's
  `text_model_output` / `vision_model_output` convention), with a list of layer indices passed through;
- `main_input_name` is an argument of `forward` (class and instance), and the one positional argument it takes;
- `DmilConfig()` builds (valid but empty) and round-trips through `to_dict` / `to_diff_dict` / `from_dict`;
- `torch.export.export` and `torch.compile(fullgraph=True)` work, with the same outputs / losses as eager;
- a plain `Trainer` with default `TrainingArguments` (`remove_unused_columns=True`) trains and evaluates on processor
  outputs, including feature modalities with user-chosen names.

transformers' own generic tests run against DMIL in `test_transformers_common.py` (from its source distribution);
the checks that do not apply there are listed with their reasons in that file.
"""

import copy
import inspect

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    BertTokenizer,
    Trainer,
    TrainingArguments,
    ViTImageProcessor,
    WhisperFeatureExtractor,
)

from dmil_hf import METHODS as REGISTERED_METHODS
from dmil_hf import DmilConfig, DmilForMultimodalClassification, DmilModel, build_model
from dmil_hf.configuration_dmil import TOWER_MODALITIES
from dmil_hf.modeling_dmil import TOWER_OUTPUTS, DmilClassifierOutput, DmilGaussianBottleneck
from dmil_hf.processing_dmil import DmilProcessor
from dmil_hf.towers import text_tower_config

from conftest import COMBINATIONS, VOCAB, ModelTester

METHODS = tuple(REGISTERED_METHODS)


def _build(method, tester, **overrides):
    torch.manual_seed(0)
    return build_model(method, tester.config(**overrides))


def _assert_same(a, b, path="output"):
    """Recursive equality of tensors inside tuples / dicts (the generic `test_model_outputs_equivalence`)."""
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=path)
    else:
        assert a == b, path


# --- return_dict, outputs[0], determinism ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("with_labels", [False, True])
def test_tuple_and_dict_outputs_are_equivalent(method, with_labels):
    tester = ModelTester(COMBINATIONS["text+vision"])
    model = _build(method, tester).eval()
    kwargs = dict(tester.inputs(), **({"labels": tester.labels()} if with_labels else {}))
    with torch.no_grad():
        as_dict = model(**kwargs)
        torch.manual_seed(0)  # i2moe draws noise with labels
        as_tuple = model(**kwargs, return_dict=False)
        torch.manual_seed(0)
        as_dict = model(**kwargs)
    assert isinstance(as_dict, DmilClassifierOutput) and type(as_tuple) is tuple
    _assert_same(as_tuple, as_dict.to_tuple())
    assert len(as_tuple) == len(as_dict.keys())
    # config.return_dict=False does the same, and the argument overrides it.
    model.config.return_dict = False
    with torch.no_grad():
        torch.manual_seed(0)
        from_config = model(**kwargs)
        overridden = model(**kwargs, return_dict=True)
    assert type(from_config) is tuple
    _assert_same(from_config, as_tuple)
    assert isinstance(overridden, DmilClassifierOutput)


def test_base_model_tuple_starts_with_component_embeds():
    tester = ModelTester(COMBINATIONS["text+vision+audio"])
    model = DmilModel(tester.config()).eval()
    with torch.no_grad():
        out = model(**tester.inputs())
        first = model(**tester.inputs(), return_dict=False)[0]
    assert list(out.keys())[0] == "component_embeds"
    assert isinstance(first, torch.Tensor) and first.shape == (tester.batch_size, 3 + 2, 16)
    torch.testing.assert_close(out[0], out.component_embeds)
    torch.testing.assert_close(first, out.component_embeds)
    # Dicts and names come last.
    assert list(out.keys())[-2:] == ["loss_terms", "component_names"]


@pytest.mark.parametrize("method", METHODS)
def test_classifier_first_output_is_loss_then_logits(method):
    tester = ModelTester(COMBINATIONS["two features"])
    model = _build(method, tester).eval()
    with torch.no_grad():
        without = model(**tester.inputs(), return_dict=False)
        with_labels = model(**tester.inputs(), labels=tester.labels(), return_dict=False)
    assert without[0].shape == (tester.batch_size, tester.num_labels)
    assert with_labels[0].dim() == 0 and with_labels[1].shape == (tester.batch_size, tester.num_labels)


@pytest.mark.parametrize("method", METHODS)
def test_determinism(method):
    """Eval mode: two calls give identical outputs. Train mode: the same seed gives the same loss."""
    tester = ModelTester(COMBINATIONS["text+vision"])
    model = _build(method, tester)
    inputs, labels = tester.inputs(), tester.labels()
    model.eval()
    with torch.no_grad():
        a, b = model(**inputs), model(**inputs)
    _assert_same(a.logits, b.logits)
    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        losses.append(model(**inputs, labels=labels).loss.item())
    assert losses[0] == losses[1]


# --- hidden states and attentions -----------------------------------------------------------------------------


def test_output_hidden_states_as_tower_outputs():
    tester = ModelTester(("text", "vision", "alpha"))
    model = DmilForMultimodalClassification(tester.config()).eval()
    inputs = tester.inputs()
    with torch.no_grad():
        plain = model(**inputs)
        out = model(**inputs, output_hidden_states=True)
    assert not set(TOWER_OUTPUTS) & set(plain.keys())
    # One output per transformers tower (the feature tower "alpha" has none), as the tower itself returns it.
    assert {"text_model_output", "vision_model_output"} == set(TOWER_OUTPUTS) & set(out.keys())
    text_layers = model.config.text_config.num_hidden_layers
    assert len(out.text_model_output.hidden_states) == text_layers + 1
    assert out.text_model_output.hidden_states[0].shape == (tester.batch_size, inputs["text_input_ids"].shape[1], 32)
    assert len(out.vision_model_output.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    with torch.no_grad():
        alone = model.dmil.encoders.towers["text"](input_ids=inputs["text_input_ids"],
                                                   attention_mask=inputs["text_attention_mask"])
    torch.testing.assert_close(out.text_model_output.last_hidden_state, alone.last_hidden_state)
    # The flag changes nothing else, and config.output_hidden_states is honoured.
    torch.testing.assert_close(out.logits, plain.logits)
    model.config.output_hidden_states = True
    with torch.no_grad():
        from_config = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert from_config.vision_model_output is not None
    # In the tuple, the tower outputs come after the tensors and before loss_terms, each a tuple itself.
    keys = list(from_config.keys())
    position = keys.index("text_model_output")
    assert keys.index("logits") < position < keys.index("loss_terms")
    assert type(as_tuple[position]) is tuple
    _assert_same(as_tuple[position], from_config.text_model_output.to_tuple())


def test_output_hidden_states_of_chosen_layers():
    """A list of layer indices (transformers' `output_hidden_states=[0, -1]`) reaches the towers: only those layers
    are kept, the others are None."""
    tester = ModelTester(("text", "vision"))
    model = DmilModel(tester.config()).eval()
    with torch.no_grad():
        every = model(**tester.inputs(), output_hidden_states=True)
        chosen = model(**tester.inputs(), output_hidden_states=[0, -1])
    for key in ("text_model_output", "vision_model_output"):
        full, kept = every[key].hidden_states, chosen[key].hidden_states
        assert len(kept) == len(full) == 3
        torch.testing.assert_close(kept[0], full[0])
        torch.testing.assert_close(kept[-1], full[-1])
        assert kept[1] is None


@pytest.mark.parametrize("method", ["dmil", "i2moe"])
def test_output_attentions_with_eager_attention(method):
    tester = ModelTester(("text", "vision"))
    model = _build(method, tester).eval()
    model.set_attn_implementation("eager")  # SDPA computes no attention weights
    inputs = tester.inputs()
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    assert out.text_model_output.attentions is not None and out.vision_model_output.attentions is not None
    layers, heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    seq = inputs["text_input_ids"].shape[1]
    attentions = out.text_model_output.attentions
    assert len(attentions) == layers
    assert attentions[0].shape == (tester.batch_size, heads, seq, seq)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(tester.batch_size, heads, seq))


# --- main_input_name and the visible forward signature ---------------------------------------------------------


@pytest.mark.parametrize("model_class", [DmilModel, DmilForMultimodalClassification])
def test_main_input_name_is_a_forward_argument(model_class):
    # Class level, as transformers' generic test reads it: the first argument after `self`.
    params = list(inspect.signature(model_class.forward).parameters)
    assert params[1] == model_class.main_input_name
    # Instance level (what Trainer reads to count tokens and FLOPs): the first modality's main input, listed first.
    tester = ModelTester(("text", "vision"))
    model = model_class(tester.config())
    visible = list(inspect.signature(model.forward).parameters)
    assert model.main_input_name == "text_input_ids" == visible[0]
    assert model.main_input_name in tester.inputs()


@pytest.mark.parametrize("method", METHODS)
def test_forward_signature_lists_every_modality_input(method):
    # User-chosen feature names (not conftest's alpha / beta).
    config = DmilConfig(text_config=text_tower_config("tiny", vocab_size=VOCAB),
                        feature_modalities={"acoustic_mfcc": 5, "gaze": 3}, num_labels=3, hidden_size=32, latent_size=16)
    model = build_model(method, config)
    visible = set(inspect.signature(model.forward).parameters)
    assert {"text_input_ids", "text_attention_mask", "acoustic_mfcc_features", "acoustic_mfcc_attention_mask",
            "gaze_features", "modality_mask", "labels", "return_dict", "output_hidden_states",
            "output_attentions"} <= visible
    assert model.main_input_name == "text_input_ids"
    # A copy keeps its own (bound) forward.
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone and set(inspect.signature(clone.forward).parameters) == visible


def test_one_positional_argument_is_the_main_input():
    """`model(input_ids)`, as transformers models take it: the first modality's main input; the others absent."""
    tester = ModelTester(("text", "alpha"))
    model = DmilForMultimodalClassification(tester.config()).eval()
    ids = tester.inputs()["text_input_ids"]
    with torch.no_grad():
        positional = model(ids)
        by_name = model(text_input_ids=ids)
    torch.testing.assert_close(positional.logits, by_name.logits)
    assert positional.modality_mask.tolist() == [[True, False]] * tester.batch_size
    with pytest.raises(TypeError, match=r"at most one positional argument, the main input text_input_ids; got 2"):
        model(ids, ids)
    with pytest.raises(TypeError, match=r"got 1 positional argument\(s\) and text_input_ids= as well"):
        model(ids, text_input_ids=ids)


# --- configuration -------------------------------------------------------------------------------------------


def test_config_default_construction_is_valid_but_empty():
    config = DmilConfig()
    assert config.modalities == () and config.num_labels == 2
    assert config.component_names == ("redundancy", "synergy")
    for model_class in (DmilModel, DmilForMultimodalClassification):
        with pytest.raises(ValueError, match=r"at least two modalities.*empty config"):
            model_class(config)
    with pytest.raises(ValueError, match="at least two modalities"):
        build_model("joint", DmilConfig())


@pytest.mark.parametrize("make", [DmilConfig, lambda: ModelTester((*TOWER_MODALITIES, "alpha")).config(),
                                  lambda: build_model("i2moe", ModelTester(("alpha", "beta")).config()).config],
                         ids=["default", "towers+features", "i2moe"])
def test_config_dict_round_trips(make):
    config = make()
    cls = type(config)
    again = cls.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.modalities == config.modalities
    diff = config.to_diff_dict()
    from_diff = cls.from_dict(diff)
    assert from_diff.to_dict() == config.to_dict()
    assert cls.from_dict(cls().to_dict()).to_dict() == cls().to_dict()
    for modality in config.modalities:
        if config.tower_config(modality) is not None:
            assert from_diff.tower_config(modality).to_dict() == config.tower_config(modality).to_dict()


def test_config_json_round_trip(tmp_path):
    config = ModelTester(("text", "alpha")).config()
    config.save_pretrained(tmp_path)
    assert DmilConfig.from_pretrained(tmp_path).to_dict() == {**config.to_dict()}
    assert DmilConfig.from_json_file(tmp_path / "config.json").modalities == ("text", "alpha")


# --- export and compile ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,modalities", [("dmil", ("text", "vision", "alpha")), ("joint", ("alpha", "beta")),
                                               ("ensemble", ("alpha", "beta")), ("i2moe", ("alpha", "beta"))])
def test_torch_export_reproduces_eager_outputs(method, modalities):
    """`torch.export.export` (non-strict, the default) of the eval-mode model on fixed shapes, with a per-sample
    modality mask (the missing-modality path is traced too)."""
    tester = ModelTester(modalities)
    model = _build(method, tester).eval()
    inputs = tester.inputs()
    inputs["modality_mask"] = torch.ones(tester.batch_size, len(modalities), dtype=torch.bool)
    inputs["modality_mask"][1, 0] = False
    with torch.no_grad():
        expected = model(**inputs)
    exported = torch.export.export(model, (), inputs)
    with torch.no_grad():
        got = exported.module()(**inputs)
    fields = [f for f in ("logits", "interaction_weights", "component_logits", "component_embeds", "unimodal_logits")
              if expected.get(f) is not None]
    assert "logits" in fields
    for field in fields:
        torch.testing.assert_close(got[field], expected[field], rtol=1e-5, atol=1e-5)


def test_torch_export_with_a_dynamic_batch_size():
    """One exported program serves any batch size (`torch.export.Dim` on every input's first axis)."""
    tester = ModelTester(("text", "vision", "alpha"))
    model = _build("dmil", tester).eval()
    inputs = tester.inputs()
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (), inputs, dynamic_shapes={name: {0: batch} for name in inputs})
    for size in (3, 7):
        other = tester.inputs(batch_size=size)
        with torch.no_grad():
            expected = model(**other)
        got = exported.module()(**other)
        torch.testing.assert_close(got["logits"], expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["interaction_weights"], expected.interaction_weights, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_training_matches_eager():
    """A few SGD steps of `torch.compile(model, fullgraph=True)` give the losses of eager training. Randomness is
    taken out (dropout and modality dropout 0, the Gaussian bottlenecks in eval mode, so they return their means)
    because compiled code draws random numbers in its own order; everything else (both levels, the gate, all stage-3
    losses, backward and the optimizer step) runs in training mode."""
    tester = ModelTester(("alpha", "beta"), batch_size=8)
    torch.manual_seed(0)
    reference = DmilForMultimodalClassification(tester.config(dropout=0.0, modality_dropout=0.0)).train()
    inputs, labels = tester.inputs(), tester.labels()

    def deterministic(model):
        for module in model.modules():
            if isinstance(module, DmilGaussianBottleneck):
                module.eval()
        return model

    def train(model, steps=3):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(steps):
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        return torch.stack(losses)

    eager = train(deterministic(copy.deepcopy(reference)))
    compiled = train(torch.compile(deterministic(copy.deepcopy(reference)), fullgraph=True))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert eager[-1] < eager[0]  # the steps did train


def test_hot_path_reads_no_tensor_value_when_checks_are_off(monkeypatch):
    """With `check_input_values=False` (as on an accelerator by default) a training step makes no host sync: no
    `bool(tensor)`, `.item()` or `.tolist()` on the forward/backward path of DMIL's own code."""
    tester = ModelTester(("alpha", "beta"))
    model = DmilForMultimodalClassification(tester.config(check_input_values=False)).train()
    inputs, labels = tester.inputs(), tester.labels()
    mask = torch.ones(tester.batch_size, 2, dtype=torch.bool)
    mask[0, 1] = False

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the hot path")

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    loss = model(**inputs, labels=labels, modality_mask=mask).loss
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss)


# --- a plain Trainer with default arguments --------------------------------------------------------------------


def _processor(tmp_path):
    words = ["hello", "world", "the", "cat", "sat", "on", "a", "mat"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return DmilProcessor(tokenizer=BertTokenizer(vocab=str(vocab)),
                         image_processor=ViTImageProcessor(size={"height": 16, "width": 16}),
                         feature_extractor=WhisperFeatureExtractor(feature_size=40, chunk_length=1))


def _default_args(tmp_path):
    # Only what a user must choose (where to write, how long); remove_unused_columns keeps its default (True).
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, report_to="none")
    assert args.remove_unused_columns is True
    return args


def _train_and_evaluate(model, dataset, tmp_path, processor=None):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=_default_args(tmp_path), train_dataset=dataset, eval_dataset=dataset,
                      processing_class=processor)
    result = trainer.train()
    assert trainer.state.global_step == 3 and np.isfinite(result.training_loss)
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed
    prediction = trainer.predict(dataset)
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    assert logits.shape == (len(dataset), model.config.num_labels)
    return trainer


def test_plain_trainer_on_processor_outputs_text_image_audio(tmp_path):
    rng = np.random.default_rng(0)
    processor = _processor(tmp_path)
    n = 12
    texts = [" ".join(rng.choice(["hello", "world", "the", "cat", "sat"], size=3 + i % 3)) for i in range(n)]
    images = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(n)]
    clips = [rng.standard_normal(16000).astype(np.float32) * 0.1 for _ in range(n)]
    batch = processor(text=texts, images=images, audio=clips, sampling_rate=16000)
    columns = {key: value.tolist() for key, value in batch.items()}
    dataset = Dataset.from_dict({**columns, "label": [i % 3 for i in range(n)]})
    tester = ModelTester(TOWER_MODALITIES)
    config = tester.config()
    config.text_config.vocab_size = VOCAB
    torch.manual_seed(0)
    # As a user's script would: a saved checkpoint loaded through the Auto class.
    DmilForMultimodalClassification(config).save_pretrained(tmp_path / "ckpt")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    trainer = _train_and_evaluate(model, dataset, tmp_path, processor)
    assert {"text_input_ids", "text_attention_mask", "vision_pixel_values", "audio_input_features"} <= set(
        trainer._signature_columns)


@pytest.mark.parametrize("method", METHODS)
def test_plain_trainer_on_two_named_feature_modalities(method, tmp_path):
    rng = np.random.default_rng(1)
    n = 12
    processor = DmilProcessor(tokenizer=_processor(tmp_path).tokenizer)  # features need no sub-processor
    batch = processor(features={"acoustic_mfcc": rng.standard_normal((n, 5)), "gaze": rng.standard_normal((n, 3))})
    dataset = Dataset.from_dict({**{k: v.tolist() for k, v in batch.items()}, "label": [i % 3 for i in range(n)],
                                 "note": ["an unused column"] * n})
    config = DmilConfig(feature_modalities={"acoustic_mfcc": 5, "gaze": 3}, num_labels=3, hidden_size=32,
                        latent_size=16)
    torch.manual_seed(0)
    model = build_model(method, config)
    trainer = _train_and_evaluate(model, dataset, tmp_path)
    # The unused column was removed, the modality columns kept.
    kept = set(trainer._remove_unused_columns(dataset).column_names)
    assert kept == {"acoustic_mfcc_features", "gaze_features", "label"}


def test_profile_train_step_compile_reports_eager_and_compiled_step_times():
    from dmil_hf.profiling import profile_train_step

    config = DmilConfig(feature_modalities={"a": 4, "b": 3}, num_labels=2, hidden_size=16)
    result = profile_train_step(config, ["joint"], batch_size=8, steps=2, compile=True, steps_per_epoch=10)
    assert result["step_ms"]["joint"] > 0 and result["compiled_step_ms"]["joint"] > 0
    assert result["compile_seconds"]["joint"] > result["compile_seconds_warm"]["joint"] > 0  # inductor's cache
    assert result["compile_speedup"]["joint"] == pytest.approx(result["step_ms"]["joint"] /
                                                               result["compiled_step_ms"]["joint"])
    saved = (result["step_ms"]["joint"] - result["compiled_step_ms"]["joint"]) / 1000
    steps = result["break_even_steps"]["joint"]
    # Compiling pays after compile time / time saved per step, or never when it saves nothing.
    assert steps == (pytest.approx(result["compile_seconds"]["joint"] / saved) if saved > 0 else None)
    assert result["break_even_epochs"]["joint"] == (None if steps is None else pytest.approx(steps / 10))
