"""The self-checking export: a self-contained Hub folder that must reload, without `dmil_hf`, to the same outputs.

`export_model` writes config (with `auto_map`), safetensors weights, the `*_dmil.py` remote code, the processor, the
run files and the model card, then runs `reload_check.py` by path in a fresh process in which `dmil_hf` cannot be
imported, and compares its outputs on `check_inputs` (all modalities, and all but the last) with the original model's
to `EXPORT_TOLERANCE`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .card import write_model_card

logger = logging.getLogger(__name__)

# Files of a training run that travel with the exported model (the card links the plot).
RUN_FILES = ("metrics.json", "interaction_profile.json", "interaction_weights.png")
EXPORT_TOLERANCE = 1e-5
RELOAD_CHECK = Path(__file__).with_name("reload_check.py")


class ExportCheckError(RuntimeError):
    """The exported folder did not reload in a fresh process, or its outputs differ from the original model's."""


def _encoders(model):
    encoders = getattr(model.base_model, "encoders", None)
    if encoders is None:
        raise TypeError(f"{type(model).__name__} has no `encoders`; expected a dmil_hf model.")
    return encoders


def check_inputs(model, batch_size: int = 2, seed: int = 0) -> dict:
    """Deterministic random inputs for every modality of `model`, shaped from its config: token ids below the
    vocabulary size, pixel values of the vision tower's image size and channels, audio for the audio tower's main
    input, and feature vectors of each feature modality's width."""
    import torch

    config, encoders = model.config, _encoders(model)
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for modality in config.modalities:
        sub = config.tower_config(modality)
        if sub is None:
            inputs[f"{modality}_features"] = torch.randn(batch_size, config.feature_modalities[modality], generator=g)
            continue
        main = encoders.main_input_name(modality)
        if main == "input_ids":
            length = min(8, getattr(sub, "max_position_embeddings", 8) or 8)
            inputs["text_input_ids"] = torch.randint(0, sub.vocab_size, (batch_size, length), generator=g)
            mask = torch.ones(batch_size, length, dtype=torch.long)
            mask[0, length // 2:] = 0  # one padded sample, so masked pooling is compared too
            if "attention_mask" in encoders.input_names(modality):
                inputs["text_attention_mask"] = mask
        elif main == "pixel_values":
            size = getattr(sub, "image_size", 224)
            height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
            channels = getattr(sub, "num_channels", 3)
            inputs["vision_pixel_values"] = torch.rand(batch_size, channels, height, width, generator=g)
        elif main == "input_features":
            bins = getattr(sub, "num_mel_bins", None) or getattr(sub, "feature_size", 80)
            frames = 2 * sub.max_source_positions if hasattr(sub, "max_source_positions") else 100
            inputs["audio_input_features"] = torch.randn(batch_size, bins, frames, generator=g)
        elif main == "input_values":
            inputs["audio_input_values"] = torch.randn(batch_size, 16000, generator=g)
        else:
            raise ValueError(f"cannot build check inputs for the {modality} tower's main input {main!r}.")
    return inputs


def _check_cases(model) -> dict[str, dict]:
    """All modalities, and all but the last one (the missing-modality path must travel too)."""
    full = check_inputs(model)
    last = model.config.modalities[-1]
    partial = {k: v for k, v in full.items() if not k.startswith(f"{last}_")}
    return {"full": full, f"without_{last}": partial}


def _processor_sample(processor, seed: int = 0):
    """Raw inputs for the processor check: `(keyword arguments, arrays)` with texts, uint8 images and waveforms."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sample, arrays = {}, {}
    if getattr(processor, "tokenizer", None) is not None:
        sample["text"] = ["a short example", "another, slightly longer example sentence"]
    if getattr(processor, "image_processor", None) is not None:
        arrays["images"] = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    if getattr(processor, "feature_extractor", None) is not None:
        rate = int(getattr(processor.feature_extractor, "sampling_rate", None) or 16000)
        arrays["audio"] = (0.1 * rng.standard_normal((2, rate))).astype(np.float32)
        sample["sampling_rate"] = rate
    return sample, arrays


def _reload_in_fresh_process(output_dir: Path, cases: dict, processor_sample, timeout: float) -> tuple[dict, dict]:
    """Run `reload_check.py` on the export in a fresh process; returns its outputs on `cases` and the processor sample,
    and the classes it loaded."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(prefix="dmil-export-check-") as work:
        work = Path(work)
        save_file({f"{case}/{k}": v.clone().contiguous() for case, inputs in cases.items() for k, v in inputs.items()},
                  str(work / "inputs.safetensors"))
        sample, arrays = processor_sample if processor_sample is not None else (None, {})
        (work / "processor.json").write_text(json.dumps(sample))
        np.savez(work / "processor_arrays.npz", **arrays)
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf_home"),
                   HF_MODULES_CACHE=str(work / "hf_home" / "modules"), TOKENIZERS_PARALLELISM="false")
        try:
            result = subprocess.run([sys.executable, str(RELOAD_CHECK), str(output_dir.resolve()), str(work)],
                                    env=env, cwd=work, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ExportCheckError(
                f"reloading the export in a fresh process took more than {timeout:.0f} s; the folder is left at "
                f"{output_dir} for inspection.") from None
        if result.returncode != 0:
            raise ExportCheckError(
                f"the exported folder {output_dir} does not load with trust_remote_code in a fresh process without "
                f"dmil_hf (left there for inspection). Its error:\n{result.stderr[-3000:]}")
        return load_file(str(work / "outputs.safetensors")), json.loads((work / "info.json").read_text())


def export_model(model_dir, output_dir, overwrite: bool = False, allow_pickle: bool = False,
                 repo_id: str | None = None, revision: str | None = None, timeout: float = 600) -> dict:
    """
    Write a self-contained Hub folder for a saved model and prove that it reloads.

    The folder holds `config.json` (with `auto_map`), `model.safetensors`, the remote-code files
    (`configuration_dmil.py`, `modeling_dmil.py`, and `processing_dmil.py` with the processor files when the model
    has a processor), the run's `metrics.json` / `interaction_profile.json` / `interaction_weights.png` when present,
    and a README.md model card. It is then reloaded with `AutoModelForSequenceClassification.from_pretrained(...,
    trust_remote_code=True)` in a fresh Python process in which `dmil_hf` cannot be imported (offline, empty
    `HF_HOME`), and its logits and interaction weights on deterministic random inputs (all modalities, and all but
    the last) must match the original model's to 1e-5; the processor's outputs must match too.

    Args:
        model_dir: folder written by `save_pretrained` / `dmil train`.
        output_dir: where to write the export; must be empty or absent unless `overwrite=True`.
        overwrite: replace a non-empty `output_dir`.
        allow_pickle: also load pickle (`.bin`) weights; only for checkpoints you trust (the export is safetensors).
        repo_id, revision: passed to the model card (its title and usage snippet).
        timeout: seconds allowed for the fresh-process reload.

    Returns:
        `{"output_dir", "files", "model_class", "processor_class", "max_abs_diff": {output: float}}`.

    Raises:
        FileExistsError: `output_dir` is not empty and `overwrite` is False.
        ExportCheckError: the export does not reload, or its outputs differ; the folder is left for inspection.
    """
    import torch
    from transformers import AutoProcessor

    from ..loading import load_model

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    source, target = model_dir.resolve(), output_dir.resolve()
    if target == source or target in source.parents:
        raise ValueError(f"output_dir {str(output_dir)!r} holds the model being exported; choose another folder.")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        if not overwrite:
            raise FileExistsError(f"output folder {str(output_dir)!r} is not empty; pass overwrite=True (--overwrite) "
                                  "to replace it.")
        shutil.rmtree(output_dir) if output_dir.is_dir() else output_dir.unlink()

    model = load_model(model_dir, allow_pickle=allow_pickle).eval()
    has_processor = (model_dir / "processor_config.json").exists()
    processor = AutoProcessor.from_pretrained(model_dir) if has_processor else None
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    for name in RUN_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, output_dir / name)
    write_model_card(output_dir, repo_id=repo_id, revision=revision)

    cases = _check_cases(model)
    expected = {}
    with torch.no_grad():
        for case, inputs in cases.items():
            out = model(**inputs)
            for name in ("logits", "interaction_weights"):
                if getattr(out, name, None) is not None:
                    expected[f"{case}/{name}"] = getattr(out, name)
    processor_sample = _processor_sample(processor) if processor is not None else None
    if processor_sample is not None:
        sample, arrays = processor_sample
        call = dict(sample, **{k: list(v) for k, v in arrays.items()})
        for key, value in processor(**call, return_tensors="pt").items():
            expected[f"processor/{key}"] = value
    got, info = _reload_in_fresh_process(output_dir, cases, processor_sample, timeout)

    missing = sorted(set(expected) - set(got))
    if missing:
        raise ExportCheckError(f"the reloaded export did not return {missing}; the folder is left at {output_dir} "
                               "for inspection.")
    diffs = {}
    for key, value in expected.items():
        other = got[key]
        if other.shape != value.shape:
            raise ExportCheckError(f"{key} has shape {tuple(other.shape)} after the reload but {tuple(value.shape)} "
                                   f"before; the folder is left at {output_dir} for inspection.")
        diffs[key] = float((other.double() - value.double()).abs().max()) if value.numel() else 0.0
    bad = {k: v for k, v in diffs.items() if not v <= EXPORT_TOLERANCE}
    if bad:
        raise ExportCheckError(
            f"the export reloaded in a fresh process gives different outputs (max abs difference {bad}, tolerance "
            f"{EXPORT_TOLERANCE}); the folder is left at {output_dir} for inspection.")
    files = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file())
    logger.info(f"Exported {model_dir} to {output_dir}: reloads without dmil_hf, outputs match to "
                f"{max(diffs.values(), default=0.0):.2e}.")
    return {"output_dir": str(output_dir), "files": files, "model_class": info.get("model_class"),
            "processor_class": info.get("processor_class"), "max_abs_diff": diffs}
