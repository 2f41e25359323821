"""dmil_hf.pipeline: `pipeline("multimodal-classification", model=DIR)` on raw text, images, audio and features."""

import numpy as np
import pytest
import torch
from transformers import pipeline

from dmil_hf import DmilForMultimodalClassification, DmilProcessor
from dmil_hf.configuration_dmil import TOWER_MODALITIES
from dmil_hf.pipeline import TASK, MultimodalClassificationPipeline, register_pipeline
from dmil_hf.towers import audio_feature_extractor, image_processor, train_text_tokenizer

from conftest import FEATURE_DIMS, VOCAB, ModelTester

LABELS = {0: "cat", 1: "dog", 2: "bird"}
RATE = 16000


def sample(*modalities, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    if "text" in modalities:
        out["text"] = ["a cat sat on the mat", "the dog barks", "a bird sings"][seed % 3]
    if "image" in modalities:
        out["image"] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    if "audio" in modalities:
        out["audio"] = (0.1 * rng.standard_normal(RATE)).astype(np.float32)
        out["sampling_rate"] = RATE
    return out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny text + vision + audio DMIL model saved with its processor, loaded through `pipeline()`."""
    register_pipeline()
    path = tmp_path_factory.mktemp("trimodal")
    torch.manual_seed(0)
    config = ModelTester(TOWER_MODALITIES).config()
    config.id2label, config.label2id = LABELS, {v: k for k, v in LABELS.items()}
    DmilForMultimodalClassification(config).save_pretrained(path)
    tokenizer = train_text_tokenizer(["a cat sat on the mat", "the dog barks", "a bird sings"] * 5, vocab_size=VOCAB)
    DmilProcessor(tokenizer=tokenizer, image_processor=image_processor(num_channels=3),
                  feature_extractor=audio_feature_extractor()).save_pretrained(path)
    return pipeline(TASK, model=str(path), device="cpu")


def direct(classifier, raw):
    """The model's own answer on the processor's output: what the pipeline must reproduce."""
    call = {}
    if "text" in raw:
        call["text"] = [raw["text"]]
    if "image" in raw:
        call["images"] = [raw["image"]]
    if "audio" in raw:
        call.update(audio=[raw["audio"]], sampling_rate=raw["sampling_rate"])
    with torch.no_grad():
        out = classifier.model(**classifier.processor(**call, return_tensors="pt"))
    return out.logits.softmax(-1)[0], out.interaction_weights[0]


@pytest.mark.parametrize("given", [("text", "image"), ("image", "audio"), ("text", "image", "audio")],
                         ids=["text+image", "image+audio", "all three"])
def test_labels_and_interaction_weights(classifier, given):
    assert isinstance(classifier, MultimodalClassificationPipeline)
    raw = sample(*given)
    result = classifier(raw)
    scores = [s["score"] for s in result["scores"]]
    assert [s["label"] for s in result["scores"]] and {s["label"] for s in result["scores"]} == set(LABELS.values())
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    weights = result["interaction_weights"]
    assert list(weights) == list(classifier.model.config.component_names)
    assert abs(sum(weights.values()) - 1) < 1e-5
    absent = {"text": "text", "image": "vision", "audio": "audio"}
    for key, modality in absent.items():
        if key not in given:
            assert weights[f"unique_{modality}"] == 0.0  # (synergy stays: two modalities remain)
    probabilities, expected_weights = direct(classifier, raw)
    assert result["scores"][0]["label"] == LABELS[int(probabilities.argmax())]
    assert abs(result["scores"][0]["score"] - float(probabilities.max())) < 1e-6
    np.testing.assert_allclose(list(weights.values()), expected_weights.tolist(), atol=1e-6)


def test_list_input_batching_and_top_k(classifier):
    samples = [sample("text", "image", seed=0), sample("image", "audio", seed=1), sample("text", "image", seed=2)]
    one_by_one = [classifier(s) for s in samples]
    batched = classifier(samples, batch_size=3, top_k=2)
    assert len(batched) == 3 and all(len(r["scores"]) == 2 for r in batched)
    for single, many in zip(one_by_one, batched):
        assert many["scores"][0]["label"] == single["scores"][0]["label"]
        assert abs(many["scores"][0]["score"] - single["scores"][0]["score"]) < 1e-5
        np.testing.assert_allclose(list(many["interaction_weights"].values()),
                                   list(single["interaction_weights"].values()), atol=1e-5)


def test_audio_and_image_forms_agree(classifier, tmp_path):
    import soundfile
    from PIL import Image

    raw = sample("image", "audio", seed=3)
    reference = classifier(raw)
    soundfile.write(tmp_path / "clip.wav", raw["audio"], RATE, subtype="FLOAT")
    Image.fromarray(raw["image"]).save(tmp_path / "image.png")
    forms = [
        {"image": Image.fromarray(raw["image"]), "audio": {"array": raw["audio"], "sampling_rate": RATE}},
        {"image": str(tmp_path / "image.png"), "audio": str(tmp_path / "clip.wav")},
    ]
    for form in forms:
        result = classifier(form)
        assert result["scores"][0] == pytest.approx(reference["scores"][0], abs=1e-5)
    result = classifier({"image": raw["image"], "audio": raw["audio"]}, sampling_rate=RATE)
    assert result["scores"][0] == pytest.approx(reference["scores"][0], abs=1e-5)


def test_bad_samples_have_clear_errors(classifier):
    with pytest.raises(ValueError, match=r"unknown or unsupported keys \['video'\]"):
        classifier({"text": "a cat", "video": [1, 2]})
    with pytest.raises(ValueError, match="no modality"):
        classifier({"sampling_rate": RATE})
    with pytest.raises(ValueError, match="without a sampling rate"):
        classifier({"audio": np.zeros(RATE, dtype=np.float32)})
    with pytest.raises(TypeError, match="expected a dict"):
        classifier(["a cat"])
    with pytest.raises(ValueError, match="top_k"):
        classifier({"text": "a cat"}, top_k=0)


def test_feature_only_model_without_processor(tmp_path):
    register_pipeline()
    torch.manual_seed(0)
    DmilForMultimodalClassification(ModelTester(("alpha", "beta")).config()).save_pretrained(tmp_path)
    classifier = pipeline(TASK, model=str(tmp_path), device="cpu")
    assert classifier.processor is None
    features = {f"{name}_features": np.ones(FEATURE_DIMS[name], dtype=np.float32) for name in ("alpha", "beta")}
    result = classifier(features, top_k=1)
    assert len(result["scores"]) == 1 and result["scores"][0]["label"].startswith("LABEL_")
    assert set(result["interaction_weights"]) == {"redundancy", "unique_alpha", "unique_beta", "synergy"}
    only_alpha = classifier({"alpha_features": features["alpha_features"]})
    assert only_alpha["interaction_weights"]["unique_beta"] == 0.0
    with pytest.raises(ValueError, match=r"alpha_features has shape \(3,\); expected \(6,\)"):
        classifier({"alpha_features": np.ones(3)})
    with pytest.raises(ValueError, match="takes"):
        classifier({"text": "no text tower here"})


def test_multi_label_model_scores_each_label_and_lists_those_above_one_half(tmp_path):
    register_pipeline()
    torch.manual_seed(0)
    config = ModelTester(("alpha", "beta")).config(problem_type="multi_label_classification")
    config.id2label, config.label2id = LABELS, {v: k for k, v in LABELS.items()}
    model = DmilForMultimodalClassification(config)
    with torch.no_grad():  # every component predicts the same logits, so the gated prediction is them: (4, -4, 1)
        for head in (model.component_heads, model.synergy_head):
            head.weight.zero_()
            head.bias.copy_(torch.tensor([4.0, -4.0, 1.0]))
    model.save_pretrained(tmp_path)
    classifier = pipeline(TASK, model=str(tmp_path), device="cpu")
    features = {f"{name}_features": np.ones(FEATURE_DIMS[name], dtype=np.float32) for name in ("alpha", "beta")}
    result = classifier(features)
    expected = torch.tensor([4.0, -4.0, 1.0]).sigmoid().tolist()
    assert [s["label"] for s in result["scores"]] == ["cat", "bird", "dog"]
    assert [s["score"] for s in result["scores"]] == pytest.approx([expected[0], expected[2], expected[1]])
    assert result["labels"] == ["cat", "bird"]
    assert classifier(features, top_k=1)["labels"] == ["cat", "bird"]  # top_k trims the scores, not the set
    assert sum(result["interaction_weights"].values()) == pytest.approx(1.0)
