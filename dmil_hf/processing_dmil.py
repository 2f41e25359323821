# Travels to the Hub with every checkpoint: imports only the standard library, numpy, torch, transformers and its
# sibling configuration_dmil.py (relatively); scipy (resampling) and soundfile (audio files) only when needed.
"""DMIL processor: one optional tokenizer, image processor and feature extractor, with modality-prefixed outputs."""

from __future__ import annotations

import importlib
import inspect
import math
import os

import numpy as np
import torch
from transformers import BatchFeature
from transformers.image_utils import is_pil_image, load_image
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .configuration_dmil import TOWERS

logger = logging.get_logger(__name__)

# Sub-processor attribute -> the tower modality it prepares (its outputs are prefixed by the modality's name).
_SUB_PROCESSORS = {tower.sub_processor: tower for tower in TOWERS.values()}
# Above this many filter taps the polyphase resampler gets too big (rates with a tiny common divisor).
_MAX_RESAMPLE_TAPS = 20_000_000


class _PresentSubProcessors:
    """
    `ProcessorMixin.get_attributes` made optional-aware. transformers 5 treats every name it returns as a required
    sub-processor: instance code (`__init__`, `save_pretrained`, `__repr__`) calls `self.get_attributes()`, loading
    code (`from_pretrained`, `from_args_and_dict`, `to_dict`) calls it on the class. On the class this returns all
    three names; on an instance only those that are not None, so saving skips the missing ones.
    """

    def __get__(self, instance, owner):
        if instance is None:
            return lambda: list(_SUB_PROCESSORS)
        return lambda: [name for name in _SUB_PROCESSORS if instance.__dict__.get(name) is not None]


class DmilProcessor(ProcessorMixin):
    r"""
    Prepares a batch for a DMIL model from raw text, images, audio and precomputed feature vectors. Every output key
    is prefixed by its modality so the batch feeds the model directly: `text_input_ids`, `text_attention_mask`,
    `vision_pixel_values`, `audio_input_values` or `audio_input_features` (`audio_attention_mask` when the feature
    extractor returns one) and `<name>_features` for each named feature modality.

    Args:
        tokenizer ([`PreTrainedTokenizerBase`], *optional*): for `text`, e.g. from `AutoTokenizer`.
        image_processor ([`BaseImageProcessor`], *optional*): for `images`, e.g. from `AutoImageProcessor`.
        feature_extractor ([`FeatureExtractionMixin`], *optional*): for `audio`, e.g. from `AutoFeatureExtractor`.
        image_channels (`int`, *optional*): 1 keeps images single-channel (for a grayscale vision tower), 3 converts
            everything to RGB. Defaults to 1 when the image processor normalises with a single mean, else 3.

    At least one sub-processor is required. Example:

    ```python
    >>> from transformers import AutoFeatureExtractor, AutoTokenizer
    >>> processor = DmilProcessor(tokenizer=AutoTokenizer.from_pretrained("bert-base-uncased"),
    ...                           feature_extractor=AutoFeatureExtractor.from_pretrained("facebook/wav2vec2-base"))
    >>> batch = processor(text=["a dog barks"], audio=[waveform], sampling_rate=16000)
    >>> sorted(batch)  # ['audio_input_values', 'text_attention_mask', 'text_input_ids', 'text_token_type_ids']
    ```
    """

    get_attributes = _PresentSubProcessors()

    def __init__(self, tokenizer=None, image_processor=None, feature_extractor=None, image_channels=None):
        given = {"tokenizer": tokenizer, "image_processor": image_processor, "feature_extractor": feature_extractor}
        if all(value is None for value in given.values()):
            raise ValueError("DmilProcessor needs at least one of tokenizer, image_processor or feature_extractor.")
        if image_channels not in (None, 1, 3):
            raise ValueError(f"image_channels must be 1, 3 or None (automatic); got {image_channels!r}.")
        # Set every slot first: the base __init__ asks `self.get_attributes()`, which reads them.
        for name, value in given.items():
            setattr(self, name, value)
        self.image_channels = image_channels
        super().__init__(**{name: value for name, value in given.items() if value is not None})

    # ---------------------------------------------------------------- saving and loading

    def to_dict(self):
        output = super().to_dict()
        for name in _SUB_PROCESSORS:
            if name in output and output[name] is None:
                del output[name]
        # The tokenizer is saved in its own files, so processor_config.json must say whether there is one.
        output["sub_processors"] = self.get_attributes()
        return output

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Loads only the sub-processors that were saved, each through its Auto class (so any model family works)."""
        processor_dict = processor_dict or {}
        present = processor_dict.get("sub_processors")
        args = []
        for name, tower in _SUB_PROCESSORS.items():
            if present is not None:
                saved = name in present
            elif name == "tokenizer":  # a processor_config.json without our marker: the tokenizer may be absent
                try:
                    args.append(tower.auto_class.from_pretrained(pretrained_model_name_or_path, **kwargs))
                except (OSError, ValueError):
                    args.append(None)
                continue
            else:
                saved = isinstance(processor_dict.get(name), dict)
            args.append(tower.auto_class.from_pretrained(pretrained_model_name_or_path, **kwargs) if saved else None)
        return args

    # ---------------------------------------------------------------- the public interface

    @property
    def model_input_names(self) -> list[str]:
        """The prefixed names this processor can return (named `<name>_features` depend on the call, so are absent)."""
        names = []
        for name in self.get_attributes():
            prefix = _SUB_PROCESSORS[name].name
            names += [f"{prefix}_{input_name}" for input_name in getattr(self, name).model_input_names]
        return names

    @property
    def target_image_channels(self) -> int:
        """Channels images are converted to: `image_channels`, else 1 if the image processor has one mean, else 3."""
        if self.image_channels is not None:
            return self.image_channels
        mean = getattr(self.image_processor, "image_mean", None)
        return 1 if isinstance(mean, (list, tuple)) and len(mean) == 1 else 3

    def __call__(
        self,
        text=None,
        images=None,
        audio=None,
        sampling_rate=None,
        features=None,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=None,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            text (`str` or `list[str]`, *optional*): one text or a batch.
            images (*optional*): one image or a list: PIL images, arrays `(H, W)`, `(H, W, C)` or `(C, H, W)` (numpy
                or torch), or file paths. A 4-D array is a batch. Converted to `target_image_channels` channels.
            audio (*optional*): one clip or a list: 1-D float arrays (numpy or torch; integer PCM is scaled to
                [-1, 1]) or audio file paths (read with `soundfile`). A 2-D array is a batch of equal-length clips.
            sampling_rate (`int`, *optional*): rate of the audio arrays, required with them; file paths carry their
                own. Clips are resampled to the feature extractor's rate with `scipy.signal.resample_poly`.
            features (`dict[str, array-like]`, *optional*): per named feature modality an array `(batch, dim)`
                (or `(batch, time, dim)`), returned as float32 `<name>_features`.
            return_tensors (`str`, *optional*, defaults to `"pt"`): as for any transformers processor.
            padding, truncation, max_length: passed to the tokenizer only.
            kwargs: `text_kwargs`, `images_kwargs`, `audio_kwargs`: dicts of extra options for each sub-processor
                (e.g. `audio_kwargs={"return_attention_mask": True}`).

        Returns:
            [`BatchFeature`] with modality-prefixed keys.
        """
        options = {key: dict(kwargs.pop(key, None) or {}) for key in ("text_kwargs", "images_kwargs", "audio_kwargs")}
        if kwargs:
            raise TypeError(
                f"DmilProcessor got unexpected keyword arguments {sorted(kwargs)}; pass sub-processor options as "
                "text_kwargs=, images_kwargs= or audio_kwargs= dicts."
            )
        if text is None and images is None and audio is None and not features:
            raise ValueError("Nothing to process: pass at least one of text=, images=, audio= or features=.")
        given = {"text": text, "images": images, "audio": audio}
        for name, tower in _SUB_PROCESSORS.items():
            if given[tower.processor_argument] is not None and getattr(self, name) is None:
                raise ValueError(
                    f"{tower.processor_argument} was given but this processor has no {name.replace('_', ' ')}; it has "
                    f"{', '.join(self.get_attributes())}."
                )

        # Normalise every input to a list (one entry per example) and check batch sizes before any heavy work.
        batches = {}
        if text is not None:
            if not isinstance(text, (str, list, tuple)):
                raise ValueError(f"text must be a string or a list of strings; got {type(text).__name__}.")
            batches["text"] = [text] if isinstance(text, str) else list(text)
        if images is not None:
            batches["images"] = _as_list(images, "images", rank_of_one=(2, 3))
        if audio is not None:
            batches["audio"] = _as_list(audio, "audio", rank_of_one=(1,))
            if sampling_rate is None and not all(isinstance(clip, (str, os.PathLike)) for clip in batches["audio"]):
                raise ValueError(
                    "audio was given as arrays but sampling_rate is None; pass sampling_rate=<Hz> (the feature "
                    f"extractor expects {getattr(self.feature_extractor, 'sampling_rate', None)} Hz)."
                )
            if sampling_rate is not None:
                _integer_rate(sampling_rate)
        feature_arrays = {name: _feature_array(name, value) for name, value in (features or {}).items()}
        sizes = {argument: len(batch) for argument, batch in batches.items()}
        sizes.update({f"features[{name!r}]": len(array) for name, array in feature_arrays.items()})
        for argument, size in sizes.items():
            if size == 0:
                raise ValueError(f"{argument} is empty; expected at least one example.")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Batch sizes disagree across modalities: {sizes}.")

        data = {}
        if "text" in batches:
            encoded = self.tokenizer(
                batches["text"], padding=padding, truncation=truncation, max_length=max_length,
                return_tensors=return_tensors, **options["text_kwargs"],
            )
            data.update({f"text_{key}": value for key, value in encoded.items()})
        if "images" in batches:
            channels = self.target_image_channels
            pictures = [_image_array(image, channels, index) for index, image in enumerate(batches["images"])]
            image_kwargs = {"input_data_format": "channels_last", **options["images_kwargs"]}
            if channels == 1 and getattr(self.image_processor, "do_convert_rgb", None):
                image_kwargs.setdefault("do_convert_rgb", False)  # else it would expand our single channel again
            encoded = self.image_processor(pictures, return_tensors=return_tensors, **image_kwargs)
            data.update({f"vision_{key}": value for key, value in encoded.items()})
        if "audio" in batches:
            encoded = self._extract_audio(batches["audio"], sampling_rate, return_tensors, options["audio_kwargs"])
            data.update({f"audio_{key}": value for key, value in encoded.items()})
        for name, array in feature_arrays.items():
            data[f"{name}_features"] = array
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _extract_audio(self, clips, sampling_rate, return_tensors, audio_kwargs):
        target_rate = getattr(self.feature_extractor, "sampling_rate", None)
        waveforms = []
        for index, clip in enumerate(clips):
            if isinstance(clip, (str, os.PathLike)):
                waveform, rate = _read_audio(clip)
            else:
                waveform, rate = _waveform(clip, index), sampling_rate
            if target_rate is not None:
                waveform = resample_waveform(waveform, rate, target_rate)
            waveforms.append(waveform)
        call_kwargs = {"return_tensors": return_tensors}
        if target_rate is not None:
            call_kwargs["sampling_rate"] = target_rate
        # Extractors that default to no padding (Wav2Vec2) would return ragged lists: pad to the longest clip.
        # Those with a fixed window (Whisper's "max_length", AST) keep their own default.
        padding = inspect.signature(self.feature_extractor.__call__).parameters.get("padding")
        if padding is not None and padding.default in (False, None, "do_not_pad"):
            call_kwargs["padding"] = True
        call_kwargs.update(audio_kwargs)
        return self.feature_extractor(waveforms, **call_kwargs)

    def batch_decode(self, *args, **kwargs):
        if self.tokenizer is None:
            raise ValueError("This processor has no tokenizer, so it cannot decode.")
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        if self.tokenizer is None:
            raise ValueError("This processor has no tokenizer, so it cannot decode.")
        return self.tokenizer.decode(*args, **kwargs)


# -------------------------------------------------------------------- input normalisation


def _as_list(value, argument: str, rank_of_one: tuple) -> list:
    """One example (a path, a PIL image, an array of a rank in `rank_of_one`) becomes `[value]`; a batch a list."""
    if isinstance(value, (str, os.PathLike)) or is_pil_image(value):
        return [value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim in rank_of_one:
            return [value]
        if value.ndim == max(rank_of_one) + 1:
            return list(value)
        raise ValueError(f"{argument} is an array of shape {value.shape}; expected rank {rank_of_one} for one "
                         f"example or {max(rank_of_one) + 1} for a batch.")
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{argument} has unsupported type {type(value).__name__}.")


def _image_array(image, channels: int, index: int) -> np.ndarray:
    """Any supported image as a channels-last array with `channels` channels (an alpha channel is dropped)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not path.startswith(("http://", "https://")) and not os.path.isfile(path):
            raise ValueError(f"images[{index}]: no image file at {path!r}.")
        image = load_image(path)
    if is_pil_image(image):
        image = image.convert("RGB" if channels == 3 else "L")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels-first
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images[{index}] has shape {array.shape}; expected (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4."
        )
    array = array[..., :3]
    if array.shape[-1] == channels:
        return array
    if channels == 3:
        return np.repeat(array, 3, axis=-1)
    # RGB to luminance with the ITU-R 601-2 weights PIL uses.
    gray = array.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if np.issubdtype(array.dtype, np.integer):
        gray = np.clip(np.round(gray), np.iinfo(array.dtype).min, np.iinfo(array.dtype).max)
    return gray.astype(array.dtype)[..., None]


def _waveform(clip, index: int) -> np.ndarray:
    """A clip as 1-D float32; integer PCM is scaled to [-1, 1]."""
    if isinstance(clip, torch.Tensor):
        clip = clip.detach().cpu().numpy()
    array = np.asarray(clip)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise ValueError(f"audio[{index}] has shape {array.shape}; expected a 1-D (mono) waveform.")
    if np.issubdtype(array.dtype, np.integer):
        return (array / float(np.iinfo(array.dtype).max + 1)).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"audio[{index}] has dtype {array.dtype}; expected float or integer samples.")
    return array.astype(np.float32)


def _read_audio(path) -> tuple[np.ndarray, int]:
    try:
        soundfile = importlib.import_module("soundfile")  # optional: only needed for audio file paths
    except ImportError as error:
        raise ValueError(
            f"audio was given as a file path ({os.fspath(path)!r}) but the `soundfile` package is not installed; "
            "install it or pass decoded waveforms with sampling_rate="
        ) from error
    data, rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=True)
    return data.mean(axis=1), int(rate)  # frames x channels -> mono


def _feature_array(name, value) -> np.ndarray:
    if not isinstance(name, str) or not name.isidentifier() or name in TOWERS:
        raise ValueError(f"features key {name!r} must be an identifier other than {sorted(TOWERS)}.")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"features[{name!r}] is not a rectangular numeric array: {error}") from error
    if array.ndim not in (2, 3):
        raise ValueError(
            f"features[{name!r}] has shape {array.shape}; expected (batch, dim) or (batch, time, dim) "
            "(wrap a single example's vector in a list)."
        )
    return array


# -------------------------------------------------------------------- resampling


def resample_waveform(waveform: np.ndarray, orig_rate, new_rate) -> np.ndarray:
    """
    Resamples a 1-D waveform with `scipy.signal.resample_poly` (band-limited polyphase filtering, Kaiser-windowed
    FIR); the output has `ceil(len * new_rate / orig_rate)` float32 samples. Rates whose ratio needs an impractically
    large filter (a tiny common divisor) fall back to linear interpolation, with a warning.
    """
    orig_rate, new_rate = _integer_rate(orig_rate), _integer_rate(new_rate)
    if orig_rate == new_rate:
        return waveform
    divisor = math.gcd(orig_rate, new_rate)
    up, down = new_rate // divisor, orig_rate // divisor
    if 20 * max(up, down) + 1 > _MAX_RESAMPLE_TAPS:  # resample_poly's filter: 10 zero crossings per side
        logger.warning(f"Resampling {orig_rate} Hz -> {new_rate} Hz with linear interpolation (no anti-aliasing).")
        wave = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float64))[None, None]
        size = math.ceil(up * waveform.shape[-1] / down)
        return torch.nn.functional.interpolate(wave, size=size, mode="linear").reshape(-1).numpy().astype(np.float32)
    try:
        signal = importlib.import_module("scipy.signal")  # optional on the Hub: only resampling needs it
    except ImportError as error:
        raise ValueError(f"resampling audio from {orig_rate} Hz to {new_rate} Hz needs scipy "
                         f"(scipy.signal.resample_poly); install it or pass audio at {new_rate} Hz.") from error
    return signal.resample_poly(waveform, up, down).astype(np.float32)


def _integer_rate(rate) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or rate <= 0 \
            or float(rate) != int(rate):
        raise ValueError(f"sampling_rate must be a positive whole number of Hz; got {rate!r}.")
    return int(rate)


__all__ = ["DmilProcessor", "resample_waveform"]
