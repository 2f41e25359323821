"""Randomly initialised tower presets (`tiny`, `small`) and the pre-processors that go with them.

Used by the CLI (`--towers tiny`), the benchmark, the examples and the tests, so every one of them builds the same
towers. Pretrained towers come instead from a hub id or a local folder (see `dmil_hf.pretrained`).
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import BertConfig, BertTokenizerFast, ViTConfig, WhisperConfig, WhisperFeatureExtractor

try:  # transformers with image processor backends (2026): the PIL one, by name
    from transformers import ViTImageProcessorPil
except ImportError:  # before them, ViTImageProcessor was the PIL one
    from transformers import ViTImageProcessor as ViTImageProcessorPil

TOWER_SIZES = {
    # hidden, layers, heads, intermediate
    "tiny": (32, 2, 2, 64),
    "small": (384, 6, 6, 1536),
}
IMAGE_SIZE = 16
PATCH_SIZE = 4
AUDIO_SECONDS = 1
MEL_BINS = 40


def _size(size: str):
    if size not in TOWER_SIZES:
        raise ValueError(f"tower size {size!r} is unknown; expected one of {sorted(TOWER_SIZES)}.")
    return TOWER_SIZES[size]


def text_tower_config(size: str = "tiny", vocab_size: int = 1000) -> BertConfig:
    hidden, layers, heads, inner = _size(size)
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=inner, max_position_embeddings=64, add_pooling_layer=False)


def vision_tower_config(size: str = "tiny", num_channels: int = 1, image_size: int = IMAGE_SIZE) -> ViTConfig:
    hidden, layers, heads, inner = _size(size)
    return ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inner,
                     image_size=image_size, patch_size=PATCH_SIZE, num_channels=num_channels)


def audio_tower_config(size: str = "tiny", seconds: int = AUDIO_SECONDS, mel_bins: int = MEL_BINS) -> WhisperConfig:
    """A Whisper encoder whose positional table is cut to `seconds` of audio (100 mel frames a second)."""
    hidden, layers, heads, inner = _size(size)
    return WhisperConfig(d_model=hidden, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=inner,
                         decoder_layers=1, decoder_attention_heads=heads, decoder_ffn_dim=inner, vocab_size=8,
                         num_mel_bins=mel_bins, max_source_positions=50 * seconds, max_target_positions=8,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def tower_configs(modalities: Iterable[str], size: str = "tiny", vocab_size: int = 1000, image_channels: int = 1) -> dict:
    """`{"text_config": ..., "vision_config": ..., "audio_config": ...}` for the tower modalities asked for."""
    builders = {
        "text": lambda: text_tower_config(size, vocab_size),
        "vision": lambda: vision_tower_config(size, image_channels),
        "audio": lambda: audio_tower_config(size),
    }
    return {f"{m}_config": builders[m]() for m in modalities if m in builders}


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> BertTokenizerFast:
    """A lower-cased WordPiece tokenizer for `texts` (for randomly initialised text towers), the same in every process.

    The vocabulary is built here rather than by `tokenizers`' WordPiece trainer, whose token ids (and, on ties, its
    vocabulary) change from one process to the next (Rust's randomly seeded hash maps): the same seed then gave a
    different model. Ids: the special tokens, every character and its `##` continuation (sorted), then whole words by
    frequency (ties in alphabetical order) up to `vocab_size`. Unknown words split into known words and characters.
    """
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted({char for word in counts for char in word})
    vocab = special + alphabet + [f"##{char}" for char in alphabet]
    words = sorted((word for word in counts if len(word) > 1), key=lambda word: (-counts[word], word))
    vocab += words[: max(0, vocab_size - len(vocab))]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return BertTokenizerFast(tokenizer_object=tokenizer, model_max_length=64)


def image_processor(image_size: int = IMAGE_SIZE, num_channels: int = 1) -> ViTImageProcessorPil:
    """The random vision tower's image processor, PIL backend named explicitly: transformers' `ViTImageProcessor` is
    now the torchvision one, which needs torchvision (not a dependency) and without it falls back to this class with a
    warning at every `dmil train` and `dmil evaluate`; naming it also gives the same pixels with or without
    torchvision."""
    mean, std = [0.5] * num_channels, [0.5] * num_channels
    return ViTImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=mean, image_std=std)


def audio_feature_extractor(seconds: int = AUDIO_SECONDS, mel_bins: int = MEL_BINS) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=mel_bins, chunk_length=seconds)


__all__ = [
    "TOWER_SIZES",
    "audio_feature_extractor",
    "audio_tower_config",
    "image_processor",
    "text_tower_config",
    "tower_configs",
    "train_text_tokenizer",
    "vision_tower_config",
]
