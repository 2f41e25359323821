"""How much the decomposition head costs next to the towers (forward latency, eval mode, CPU or GPU)."""

from __future__ import annotations

import statistics
import time

import torch


def _timed(fn, repeats: int, device) -> float:
    """Median seconds of `fn()` over `repeats` runs after two warm-up runs."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_inputs(config, batch_size: int, text_length: int = 32, generator=None) -> dict:
    """Random, valid inputs for every modality of `config` (shapes from each tower config)."""
    inputs = {}
    for modality in config.modalities:
        sub = config.tower_config(modality)
        if sub is None:
            inputs[f"{modality}_features"] = torch.randn(batch_size, config.feature_modalities[modality], generator=generator)
        elif modality == "text":
            inputs["text_input_ids"] = torch.randint(0, sub.vocab_size, (batch_size, text_length), generator=generator)
            inputs["text_attention_mask"] = torch.ones(batch_size, text_length, dtype=torch.long)
        elif modality == "vision":
            size = sub.image_size if isinstance(sub.image_size, int) else sub.image_size[0]
            inputs["vision_pixel_values"] = torch.rand(batch_size, sub.num_channels, size, size, generator=generator)
        elif hasattr(sub, "num_mel_bins"):
            inputs["audio_input_features"] = torch.randn(batch_size, sub.num_mel_bins, 2 * sub.max_source_positions,
                                                         generator=generator)
        else:
            inputs["audio_input_values"] = torch.randn(batch_size, 16000, generator=generator)
    return inputs


@torch.no_grad()
def profile_head(model, batch_size: int = 32, repeats: int = 10, device: str | None = None) -> dict:
    """Median forward latency of the towers (with projections) and of the decomposition head + gate for one batch."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    inputs = {k: v.to(device) for k, v in random_inputs(model.config, batch_size).items()}
    base = model.base_model
    embeds, mask = base.encoders(inputs)
    towers = _timed(lambda: base.encoders(inputs), repeats, device)
    if hasattr(model, "classify"):
        head = _timed(lambda: model.classify(base.decompose(embeds, mask)), repeats, device)
    else:
        head = _timed(lambda: model(**inputs), repeats, device) - towers
    return {"device": str(device), "batch_size": batch_size, "towers_ms": 1000 * towers, "head_ms": 1000 * head,
            "head_fraction_of_towers": head / towers,
            "tower_parameters": sum(p.numel() for p in base.encoders.parameters()),
            "head_parameters": sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.encoders.parameters())}


__all__ = ["profile_head", "random_inputs"]
