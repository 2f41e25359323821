"""DmilProcessor: prefixed outputs, input conversions, errors, and save -> reload for every sub-processor mix."""

import ast
import inspect
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    ASTFeatureExtractor,
    AutoProcessor,
    BertTokenizer,
    ViTImageProcessor,
    Wav2Vec2FeatureExtractor,
    WhisperFeatureExtractor,
)

from dmil_hf import processing_dmil
from dmil_hf.processing_dmil import DmilProcessor, resample_waveform

WORDS = ["hello", "world", "the", "cat", "sat", "on", "a", "mat"]
TEXTS = ["hello world", "the cat sat on a mat"]


@pytest.fixture
def tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(vocab=str(vocab))


@pytest.fixture
def image_processor():
    return ViTImageProcessor(size={"height": 16, "width": 16})


@pytest.fixture
def wav2vec2():
    return Wav2Vec2FeatureExtractor()


@pytest.fixture
def whisper():
    return WhisperFeatureExtractor(feature_size=80, chunk_length=1)


def _images(rng, n=2):
    return [rng.integers(0, 256, (20 + 3 * i, 30, 3), dtype=np.uint8) for i in range(n)]


def _clips(rng, n=2, rate=16000):
    return [rng.standard_normal(rate // 4 + 500 * i).astype(np.float32) for i in range(n)]


def test_every_modality_is_prefixed_and_batched(tokenizer, image_processor, wav2vec2):
    rng = np.random.default_rng(0)
    processor = DmilProcessor(tokenizer=tokenizer, image_processor=image_processor, feature_extractor=wav2vec2)
    batch = processor(text=TEXTS, images=_images(rng), audio=_clips(rng), sampling_rate=16000,
                      features={"alpha": rng.standard_normal((2, 6)), "beta": [[1, 2, 3, 4], [5, 6, 7, 8]]})
    assert sorted(batch) == ["alpha_features", "audio_input_values", "beta_features", "text_attention_mask",
                             "text_input_ids", "text_token_type_ids", "vision_pixel_values"]
    assert batch["text_input_ids"].shape == (2, 8)  # [CLS] + 6 words + [SEP], the shorter text padded
    assert batch["text_attention_mask"].tolist()[0] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert batch["text_input_ids"][0, 1].item() == tokenizer.convert_tokens_to_ids("hello")  # really tokenised
    assert batch["vision_pixel_values"].shape == (2, 3, 16, 16)
    assert batch["audio_input_values"].shape == (2, 4500)  # padded to the longest clip
    assert batch["alpha_features"].dtype == batch["beta_features"].dtype == torch.float32
    assert batch["alpha_features"].shape == (2, 6) and batch["beta_features"].shape == (2, 4)
    assert processor.model_input_names == ["text_input_ids", "text_token_type_ids", "text_attention_mask",
                                           "vision_pixel_values", "audio_input_values", "audio_attention_mask"]


def test_single_examples_truncation_and_numpy_output(tokenizer, image_processor):
    processor = DmilProcessor(tokenizer=tokenizer, image_processor=image_processor)
    batch = processor(text="the cat sat on a mat", images=np.zeros((8, 8, 3), np.uint8), max_length=4)
    assert batch["text_input_ids"].shape == (1, 4) and batch["vision_pixel_values"].shape == (1, 3, 16, 16)
    batch = processor(images=torch.zeros(2, 3, 9, 9, dtype=torch.uint8), features={"x": torch.ones(2, 5, 3)},
                      return_tensors="np")
    assert isinstance(batch["vision_pixel_values"], np.ndarray) and batch["vision_pixel_values"].shape == (2, 3, 16, 16)
    assert batch["x_features"].dtype == np.float32 and batch["x_features"].shape == (2, 5, 3)


@pytest.mark.parametrize(
    "extractor, key, shape",
    [
        (lambda: Wav2Vec2FeatureExtractor(return_attention_mask=True), "audio_input_values", (2, 4500)),
        (lambda: WhisperFeatureExtractor(feature_size=80, chunk_length=1), "audio_input_features", (2, 80, 100)),
        (lambda: ASTFeatureExtractor(max_length=64, num_mel_bins=64), "audio_input_values", (2, 64, 64)),
    ],
)
def test_audio_keys_follow_the_feature_extractor(extractor, key, shape):
    processor = DmilProcessor(feature_extractor=extractor())
    batch = processor(audio=_clips(np.random.default_rng(1)), sampling_rate=16000)
    assert batch[key].shape == shape
    if isinstance(processor.feature_extractor, Wav2Vec2FeatureExtractor):
        assert batch["audio_attention_mask"].sum(1).tolist() == [4000, 4500]


def test_grayscale_images_become_rgb_by_default(image_processor, tmp_path):
    processor = DmilProcessor(image_processor=image_processor)
    gray = np.random.default_rng(2).integers(0, 256, (12, 14), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    inputs = [gray, gray[..., None], Image.fromarray(gray, mode="L"), str(tmp_path / "gray.png"), tmp_path / "gray.png"]
    pixels = processor(images=inputs)["vision_pixel_values"]
    assert pixels.shape == (5, 3, 16, 16)
    assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 1], pixels[:, 2])
    assert all(torch.equal(pixels[0], pixels[i]) for i in range(1, 5))
    expected = processor(images=np.repeat(gray[..., None], 3, axis=-1))["vision_pixel_values"]
    assert torch.equal(pixels[:1], expected)


def test_single_channel_images_when_asked(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    gray = np.random.default_rng(3).integers(0, 256, (10, 10), dtype=np.uint8)
    one_mean = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5],
                                 do_convert_rgb=True)  # which we must override to keep one channel
    assert DmilProcessor(image_processor=one_mean).target_image_channels == 1  # inferred from the single mean
    processor = DmilProcessor(image_processor=one_mean, image_channels=1)
    pixels = processor(images=[gray, rgb, Image.fromarray(rgb)])["vision_pixel_values"]
    assert pixels.shape == (3, 1, 16, 16)
    assert torch.equal(pixels[1], pixels[2])  # our RGB -> luminance matches PIL's
    processor.save_pretrained(tmp_path)
    reloaded = DmilProcessor.from_pretrained(tmp_path)
    assert reloaded.image_channels == 1
    assert torch.equal(reloaded(images=[gray])["vision_pixel_values"], pixels[:1])


def test_audio_is_resampled_to_the_feature_extractor_rate(wav2vec2, tmp_path):
    processor = DmilProcessor(feature_extractor=wav2vec2)
    tone = lambda rate: np.sin(2 * np.pi * 440 * np.arange(rate // 2) / rate).astype(np.float32)  # noqa: E731
    at_8k = processor(audio=[tone(8000)], sampling_rate=8000)["audio_input_values"]
    at_16k = processor(audio=[tone(16000)], sampling_rate=16000)["audio_input_values"]
    assert at_8k.shape == at_16k.shape == (1, 8000)
    assert (at_8k - at_16k)[:, 100:-100].abs().max() < 1e-2
    # A file carries its own rate; sampling_rate is then not needed.
    soundfile = pytest.importorskip("soundfile")
    soundfile.write(tmp_path / "tone.wav", tone(8000), 8000, subtype="FLOAT")
    from_file = processor(audio=str(tmp_path / "tone.wav"))["audio_input_values"]
    assert torch.allclose(from_file, at_8k, atol=1e-6)


def test_resampler_is_band_limited_and_matches_scipy():
    for orig, new in [(8000, 16000), (44100, 16000), (22050, 16000), (16000, 8000)]:
        wave = np.sin(2 * np.pi * 440 * np.arange(orig) / orig)
        out = resample_waveform(wave, orig, new)
        assert out.shape == (new,) and out.dtype == np.float32
        exact = np.sin(2 * np.pi * 440 * np.arange(new) / new)
        assert np.abs(out - exact)[200:-200].max() < 2e-3  # resample_poly's Kaiser(5) filter ripples ~1.5e-3
    # Above the new Nyquist rate a tone must be filtered out, not aliased.
    high = np.sin(2 * np.pi * 6000 * np.arange(16000) / 16000)
    assert np.abs(resample_waveform(high, 16000, 8000))[200:-200].max() < 0.05
    signal = pytest.importorskip("scipy.signal")
    noise = np.random.default_rng(4).standard_normal(4410)
    ours = resample_waveform(noise, 44100, 16000)
    np.testing.assert_array_equal(ours, signal.resample_poly(noise, 160, 441).astype(np.float32))


def test_audio_file_without_soundfile_is_a_clear_error(wav2vec2, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(ValueError, match="soundfile"):
        DmilProcessor(feature_extractor=wav2vec2)(audio=str(tmp_path / "clip.wav"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "at least one of text=, images=, audio= or features="),
        ({"features": {}}, "at least one of text="),
        ({"images": np.zeros((8, 8, 3), np.uint8)}, "images was given but this processor has no image processor"),
        ({"text": TEXTS, "features": {"a": np.ones((3, 2))}}, "Batch sizes disagree"),
        ({"text": TEXTS, "audio": [np.zeros(100)] * 3, "sampling_rate": 16000}, "Batch sizes disagree"),
        ({"audio": [np.zeros(100)]}, "sampling_rate"),
        ({"audio": [np.zeros(100)], "sampling_rate": 8000.5}, "sampling_rate"),
        ({"audio": [np.zeros((2, 100))], "sampling_rate": 16000}, r"audio\[0\]"),
        ({"text": []}, "text is empty"),
        ({"text": 3}, "text must be"),
        ({"features": {"a": np.ones(4)}}, r"features\['a'\]"),
        ({"features": {"text": np.ones((1, 4))}}, "features key 'text'"),
        ({"features": {"a": [[1.0], [1.0, 2.0]]}}, r"features\['a'\]"),
    ],
)
def test_bad_calls_raise_value_errors_naming_the_argument(tokenizer, wav2vec2, kwargs, message):
    processor = DmilProcessor(tokenizer=tokenizer, feature_extractor=wav2vec2)
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_missing_sub_processors_and_bad_inputs(tokenizer, image_processor, wav2vec2, tmp_path):
    with pytest.raises(ValueError, match="text was given but this processor has no tokenizer"):
        DmilProcessor(image_processor=image_processor)(text="hello")
    with pytest.raises(ValueError, match="audio was given but this processor has no feature extractor"):
        DmilProcessor(tokenizer=tokenizer)(audio=[np.zeros(10)], sampling_rate=16000)
    with pytest.raises(ValueError, match="at least one of tokenizer"):
        DmilProcessor()
    with pytest.raises(ValueError, match="image_channels"):
        DmilProcessor(image_processor=image_processor, image_channels=2)
    with pytest.raises(TypeError):
        DmilProcessor(tokenizer=image_processor)  # wrong class in a slot
    with pytest.raises(TypeError, match="images_kwargs"):
        DmilProcessor(tokenizer=tokenizer)(text="hello", do_resize=False)
    with pytest.raises(ValueError, match="no image file"):
        DmilProcessor(image_processor=image_processor)(images=str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match=r"images\[0\] has shape"):
        DmilProcessor(image_processor=image_processor)(images=[np.zeros((5, 6, 7))])
    with pytest.raises(ValueError, match="no tokenizer"):
        DmilProcessor(image_processor=image_processor).batch_decode([[1, 2]])


COMBINATIONS = {
    "tokenizer only": ("tokenizer",),
    "image processor + feature extractor": ("image_processor", "wav2vec2"),
    "all three": ("tokenizer", "image_processor", "whisper"),
}


def _build(request, parts):
    slots = {"wav2vec2": "feature_extractor", "whisper": "feature_extractor"}
    return DmilProcessor(**{slots.get(part, part): request.getfixturevalue(part) for part in parts})


def _call(processor, rng):
    kwargs = {"features": {"alpha": rng.standard_normal((2, 6))}}
    if processor.tokenizer is not None:
        kwargs["text"] = TEXTS
    if processor.image_processor is not None:
        kwargs["images"] = [rng.integers(0, 256, (12, 12), dtype=np.uint8), _images(rng, 1)[0]]
    if processor.feature_extractor is not None:
        kwargs.update(audio=_clips(rng, rate=8000), sampling_rate=8000)
    return processor(**kwargs)


@pytest.mark.parametrize("parts", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_save_and_reload_gives_identical_outputs(request, parts, tmp_path):
    processor = _build(request, parts)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    present = [name for name in ("tokenizer", "image_processor", "feature_extractor") if getattr(processor, name)]
    assert config["sub_processors"] == present and config["processor_class"] == "DmilProcessor"
    assert (tmp_path / "tokenizer_config.json").exists() == ("tokenizer" in present)
    reloaded = DmilProcessor.from_pretrained(tmp_path)
    assert reloaded.get_attributes() == present
    for name in ("tokenizer", "image_processor", "feature_extractor"):
        assert (getattr(reloaded, name) is None) == (name not in present)
    expected, actual = _call(processor, np.random.default_rng(5)), _call(reloaded, np.random.default_rng(5))
    assert sorted(expected) == sorted(actual)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert pickle.loads(pickle.dumps(reloaded)).get_attributes() == present


def test_auto_processor_loads_a_registered_processor(request, tmp_path):
    from dmil_hf import DmilConfig

    AutoProcessor.register(DmilConfig, DmilProcessor, exist_ok=True)
    processor = _build(request, ("image_processor", "wav2vec2"))
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, DmilProcessor) and reloaded.get_attributes() == ["image_processor", "feature_extractor"]


def test_remote_code_loads_without_dmil_hf(request, tmp_path, monkeypatch):
    """What the Hub gives a user: the copied processing_dmil.py, loaded with trust_remote_code, no dmil_hf."""
    monkeypatch.setattr(DmilProcessor, "_auto_class", "AutoProcessor")
    for name, parts in COMBINATIONS.items():
        folder = tmp_path / "checkpoints" / name.replace(" ", "_").replace("+", "and")
        processor = _build(request, parts)
        processor.save_pretrained(folder)
        assert (folder / "processing_dmil.py").exists()
        expected = _call(processor, np.random.default_rng(6))
        np.savez(folder / "expected.npz", **{key: value.numpy() for key, value in expected.items()})
    helpers = "\n".join(inspect.getsource(function) for function in (_images, _clips, _call))
    script = f"""
import sys
sys.modules["dmil_hf"] = None  # prove the package is not needed
from pathlib import Path
import numpy as np
from transformers import AutoProcessor
TEXTS = {TEXTS!r}
{helpers}
for folder in sorted(Path({str(tmp_path / "checkpoints")!r}).iterdir()):
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor)
    actual, expected = _call(processor, np.random.default_rng(6)), np.load(folder / "expected.npz")
    assert sorted(actual) == sorted(expected.files), (sorted(actual), expected.files)
    for key in expected.files:
        assert np.array_equal(actual[key].numpy(), expected[key]), key
print("ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_hub_file_imports_only_stdlib_numpy_torch_transformers():
    source = Path(processing_dmil.__file__).read_text()
    tree = ast.parse(source)
    allowed = {"numpy", "torch", "transformers"} | set(sys.stdlib_module_names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots = [] if node.level else [node.module.split(".")[0]]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            # the optional, guarded imports: soundfile for audio files, scipy for resampling
            assert [arg.value for arg in node.args] in (["soundfile"], ["scipy.signal"])
            continue
        else:
            continue
        assert set(roots) <= allowed, f"line {node.lineno} imports {roots}"
    last = tree.body[-1]
    assert isinstance(last, ast.Assign) and last.targets[0].id == "__all__"
    assert "DmilProcessor" in ast.literal_eval(last.value)


def test_random_vision_tower_processor_saves_and_reloads_without_a_torchvision_warning(tmp_path):
    """`dmil train` and `dmil evaluate` on images: transformers' `ViTImageProcessor` needs torchvision (not a
    dependency) and, without it, falls back with a warning at each command; the preset names the PIL one instead."""
    code = (
        "import sys, numpy as np\n"
        "from transformers import AutoProcessor\n"
        "from dmil_hf import DmilProcessor\n"
        "from dmil_hf.towers import image_processor\n"
        "DmilProcessor(image_processor=image_processor(num_channels=1), image_channels=1).save_pretrained(sys.argv[1])\n"
        "processor = AutoProcessor.from_pretrained(sys.argv[1])\n"
        "print(processor(images=[np.zeros((16, 16), np.uint8)], return_tensors='np')['vision_pixel_values'].shape)\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "(1, 1, 16, 16)"
    assert "torchvision" not in run.stderr, run.stderr[-2000:]
