"""From a dataset in the `dmil_hf` column schema to model-ready tensors: the processor and the encoded splits.

The processor is built once per run (a tokenizer trained on the training texts for random towers, or the pretrained
tower's own pre-processors) and saved with the model, so `dmil evaluate`, the pipeline and the Hub card use the
same one.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, DatasetDict

from .configuration_dmil import CORRUPTION_INPUT, TOWERS, column_of
from .processing_dmil import DmilProcessor
from .towers import audio_feature_extractor, image_processor, train_text_tokenizer

MAX_TEXT_LENGTH = 128


def image_channels(dataset: Dataset) -> int:
    """1 for grayscale images (2-D arrays or mode 'L'), else 3."""
    first = dataset[0]["image"]
    if hasattr(first, "mode"):
        return 1 if first.mode in ("L", "1", "I", "F") else 3
    return 1 if np.asarray(first).ndim == 2 else 3


def build_processor(modalities, train_split: Dataset, pretrained: dict | None = None, text_vocab_size: int = 1000):
    """A `DmilProcessor` for `modalities`: pretrained pre-processors for towers named in `pretrained`
    (modality -> hub id or folder), random-tower presets for the rest; `None` when only feature modalities exist."""
    from .pretrained import resolve_pretrained

    pretrained = {modality: resolve_pretrained(source) for modality, source in (pretrained or {}).items()}
    presets = {
        "text": lambda: train_text_tokenizer(list(train_split["text"]), vocab_size=text_vocab_size),
        "vision": lambda: image_processor(num_channels=image_channels(train_split)),
        "audio": audio_feature_extractor,
    }
    parts = {tower.sub_processor: (tower.auto_class.from_pretrained(pretrained[name]) if name in pretrained
                                   else presets[name]())
             for name, tower in TOWERS.items() if name in modalities}
    if not parts:
        return None
    channels = image_channels(train_split) if "vision" in modalities and "vision" not in pretrained else None
    return DmilProcessor(**parts, image_channels=channels)


def text_length(tokenizer, texts) -> int:
    """The length a split's texts are padded to: its longest tokenised text, capped at `MAX_TEXT_LENGTH` and the
    tokenizer's `model_max_length` (only texts past the cap are truncated). Each split gets its own length, so a split
    encodes to the same tensors wherever it is encoded: in a training run (`encode_dataset`), by `dmil evaluate` or
    the benchmark (`encode_split`). A length taken from another split truncated the longer texts of the evaluation
    splits in the run's own report only (on `digits` with random towers, validation texts have up to 15 tokens,
    training ones 12)."""
    longest = max(len(ids) for ids in tokenizer(list(texts))["input_ids"])
    return min(longest, MAX_TEXT_LENGTH, tokenizer.model_max_length)


def encode_split(split: Dataset, processor, modalities, max_text_length: int | None = None,
                 batch_size: int = 256) -> Dataset:
    """Model-ready columns (`text_input_ids`, `vision_pixel_values`, `audio_input_features`, `<name>_features`,
    `labels`) for the modalities present in `split`; the `interaction` column is dropped (read it from the raw
    split). A modality whose column is missing is left out, so the model treats it as absent."""
    present = [m for m in modalities if column_of(m) in split.column_names]
    if max_text_length is None and "text" in present:
        max_text_length = text_length(processor.tokenizer, split["text"])
    feature_names = [m for m in present if m not in TOWERS]

    def encode(batch):
        kwargs = {}
        if "text" in present:
            kwargs.update(text=batch["text"], padding="max_length", truncation=True, max_length=max_text_length)
        if "vision" in present:
            kwargs["images"] = [np.asarray(image, dtype=np.uint8) for image in batch["image"]]
        if "audio" in present:
            rates = set(batch["audio_sampling_rate"])
            if len(rates) != 1:
                raise ValueError(f"column 'audio_sampling_rate' must be constant within a batch; got {sorted(rates)}.")
            kwargs.update(audio=[np.asarray(a, dtype=np.float32) for a in batch["audio"]], sampling_rate=rates.pop())
        out = {}
        if kwargs:
            out = {k: np.asarray(v) for k, v in processor(**kwargs, return_tensors="np").items()}
        for name in feature_names:
            out[column_of(name)] = np.asarray(batch[column_of(name)], dtype=np.float32)
        out["labels"] = np.asarray(batch["labels"])
        if CORRUPTION_INPUT in batch:  # training corruption levels (`dmil_hf.data.add_training_corruption`)
            out[CORRUPTION_INPUT] = np.asarray(batch[CORRUPTION_INPUT], dtype=np.float32)
        return out

    encoded = split.map(encode, batched=True, batch_size=batch_size, remove_columns=split.column_names,
                        desc="Encoding")
    return encoded.with_format("torch")


def encode_dataset(dsd: DatasetDict, processor, modalities, train: Dataset | None = None) -> DatasetDict:
    """`encode_split` for every split. Encode a dataset once and train, select and evaluate on these splits
    (`dmil_hf.experiment.evaluate_encoded`): each split encodes as `encode_split` alone encodes it, so the run's own
    test report and `dmil evaluate` see the same tensors. `train`, when given, is encoded instead of `dsd["train"]`
    (e.g. with the corrupted copies of `dmil_hf.data.add_training_corruption`)."""
    splits = {**dsd, "train": train} if train is not None else dict(dsd)
    return DatasetDict({name: encode_split(split, processor, modalities) for name, split in splits.items()})


__all__ = ["build_processor", "encode_dataset", "encode_split", "image_channels", "text_length"]
