"""Shared test set-up: offline Hugging Face, and a tiny-config ModelTester reused by every test file."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from dmil_hf import DmilConfig  # noqa: E402
from dmil_hf.configuration_dmil import TOWER_MODALITIES  # noqa: E402
from dmil_hf.towers import audio_tower_config, text_tower_config, vision_tower_config  # noqa: E402

VOCAB = 50
SEQ = 7
COMBINATIONS = {
    "text+vision": ("text", "vision"),
    "vision+audio": ("vision", "audio"),
    "text+audio": ("text", "audio"),
    "text+vision+audio": TOWER_MODALITIES,
    "two features": ("alpha", "beta"),
}
FEATURE_DIMS = {"alpha": 6, "beta": 4, "gamma": 5}


class ModelTester:
    """Builds tiny configs (hidden 32, 2 layers) and matching random inputs for any modality combination."""

    num_labels = 3

    def __init__(self, modalities, batch_size=4, seed=0, **config_kwargs):
        self.modalities = tuple(modalities)
        self.batch_size = batch_size
        self.seed = seed
        self.config_kwargs = config_kwargs

    def config(self, **overrides) -> DmilConfig:
        towers = {
            "text": lambda: text_tower_config("tiny", vocab_size=VOCAB),
            "vision": lambda: vision_tower_config("tiny", num_channels=3),
            "audio": lambda: audio_tower_config("tiny"),
        }
        kwargs = {f"{m}_config": towers[m]() for m in self.modalities if m in towers}
        features = {m: FEATURE_DIMS[m] for m in self.modalities if m in FEATURE_DIMS}
        return DmilConfig(**kwargs, feature_modalities=features, num_labels=self.num_labels,
                          hidden_size=32, latent_size=16, **{**self.config_kwargs, **overrides})

    def inputs(self, batch_size=None):
        batch = batch_size or self.batch_size
        g = torch.Generator().manual_seed(self.seed)
        out = {}
        if "text" in self.modalities:
            out["text_input_ids"] = torch.randint(5, VOCAB, (batch, SEQ), generator=g)
            out["text_attention_mask"] = torch.ones(batch, SEQ, dtype=torch.long)
            out["text_attention_mask"][0, -2:] = 0
        if "vision" in self.modalities:
            out["vision_pixel_values"] = torch.rand(batch, 3, 16, 16, generator=g)
        if "audio" in self.modalities:
            out["audio_input_features"] = torch.randn(batch, 40, 100, generator=g)
        for name, dim in FEATURE_DIMS.items():
            if name in self.modalities:
                out[f"{name}_features"] = torch.randn(batch, dim, generator=g)
        return out

    def labels(self, batch_size=None):
        return torch.arange(batch_size or self.batch_size) % self.num_labels


@pytest.fixture(params=list(COMBINATIONS), ids=list(COMBINATIONS))
def tester(request):
    return ModelTester(COMBINATIONS[request.param])


@pytest.fixture
def trimodal():
    return ModelTester(TOWER_MODALITIES)
