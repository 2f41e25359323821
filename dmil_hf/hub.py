"""To the Hub and back: model cards, a self-checking export and push.

- `render_model_card` / `write_model_card`: the card of a saved model, from the template shipped as package data
  (`dmil_hf/model_cards/dmil_model_card.md`), the model's config and the run's `metrics.json` /
  `interaction_profile.json` / `interaction_weights.png` when they lie beside it.
- `export_model`: a self-contained Hub folder (config with `auto_map`, safetensors weights, the `*_dmil.py` code,
  the processor, the card) that is reloaded in a fresh process *without* `dmil_hf` and must give the same outputs
  before the export counts as done.
- `push_model`: export to a temporary folder (so the check runs), then create the repo and upload the folder.

Example:
```python
from dmil_hf.hub import export_model, push_model

export_model("runs/dmil-digits", "exports/dmil-digits")           # checked, ready to upload by hand
push_model("runs/dmil-digits", "my-user/dmil-digits", private=True)  # returns the commit URL
```
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "dmil_model_card.md"
CARD_TAGS = ("dmil", "multimodal", "interaction-learning", "partial-information-decomposition", "arxiv:2606.11614")
PAPER_CITATION = """@inproceedings{yang2026information,
  title         = {Information-Theoretic Decomposition for Multimodal Interaction Learning},
  author        = {Yang and Wei and Ni and Xu and Hu},
  booktitle     = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year          = {2026},
  eprint        = {2606.11614},
  archivePrefix = {arXiv}
}"""
# Files of a training run that travel with the exported model (the card links the plot).
RUN_FILES = ("metrics.json", "interaction_profile.json", "interaction_weights.png")
EXPORT_TOLERANCE = 1e-5

_METHODS = {
    "dmil": ("DMIL", "Decomposition-based Multimodal Interaction Learning (Yang et al., CVPR 2026): every sample is "
             "decomposed into a redundant component, one unique component per modality and a synergistic component, "
             "each with its own classifier head, and a per-sample gate weights their predictions."),
    "dmil_joint": ("joint-fusion baseline", "the pooled modality embeddings are concatenated and classified by one "
                   "MLP trained end to end (the DMIL paper's joint-learning baseline)."),
    "dmil_ensemble": ("unimodal-ensemble baseline", "one classifier per modality, each trained on its own modality "
                      "only; the prediction averages their probabilities (the DMIL paper's ensemble baseline)."),
    "dmil_i2moe": ("I2MoE-style baseline", "interaction experts (one unique per modality, one synergy, one "
                   "redundancy) with a reweighting gate and perturbation-based interaction losses (after Xin et al., "
                   "ICML 2025)."),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ExportCheckError(RuntimeError):
    """The exported folder did not reload in a fresh process, or its outputs differ from the original model's."""


# ------------------------------------------------------------------------------------------------ model card


def _read_json(value, default_path: Path, what: str):
    """`value` as a dict: itself, a JSON file it names, or (when None) `default_path` if that exists."""
    if isinstance(value, dict):
        return value
    path = Path(value) if value is not None else default_path
    if value is None and not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {path} is not valid JSON: {err}") from None


def _number(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _is_hub_id(name: str | None) -> bool:
    """A repo id like `org/model` that is not also a local folder (local paths mean nothing on the Hub)."""
    return bool(name) and _HUB_ID.match(name) is not None and not Path(name).exists()


def _tower_rows(config) -> tuple[list[dict], list[str], list[str]]:
    """Card rows for the towers, the hub ids the towers were fine-tuned from, and the randomly initialised ones."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    rows, base_models, random_towers = [], [], []
    for modality in config.modalities:
        sub_config = config.tower_config(modality)
        if sub_config is None:
            width = config.feature_modalities[modality]
            rows.append({"modality": modality, "input": f"{modality}_features", "source": "built-in feature tower",
                         "encoder": f"feature vector of width {width} → LayerNorm + MLP"})
            continue
        name = getattr(sub_config, "_name_or_path", "") or ""
        if _is_hub_id(name):
            source = f"[`{name}`](https://huggingface.co/{name})"
            base_models.append(name)
        elif name:
            source = f"local checkpoint `{Path(name).name}`"
        else:
            source = "random initialisation"
            random_towers.append(modality)
        model_class = MODEL_MAPPING[type(sub_config)] if type(sub_config) in MODEL_MAPPING else None
        main_input = f"{modality}_{getattr(model_class, 'main_input_name', 'inputs')}"
        layers = getattr(sub_config, "num_hidden_layers", None) or getattr(sub_config, "encoder_layers", None)
        width = getattr(sub_config, "hidden_size", None) or getattr(sub_config, "d_model", None)
        shape = f", {layers} layers, width {width}" if layers and width else ""
        encoder = model_class.__name__ if model_class is not None else type(sub_config).__name__
        if getattr(sub_config, "is_encoder_decoder", False):
            encoder += " encoder"
        rows.append({"modality": modality, "input": main_input, "encoder": f"{encoder}{shape}",
                     "source": source})
    return rows, base_models, random_towers


def _eval_results(metrics: dict, primary: str) -> list:
    from huggingface_hub import EvalResult

    dataset = str(metrics.get("dataset", "unknown"))
    dataset_type = dataset if _is_hub_id(dataset) else Path(dataset).name or dataset
    common = dict(task_type="multimodal-classification", task_name="Multimodal classification",
                  dataset_type=dataset_type, dataset_name=_dataset_name(dataset))
    results = []
    for split in ("test", "validation"):
        report = metrics.get(split) or {}
        for key, value in report.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "n" and math.isfinite(value):
                results.append(EvalResult(**common, dataset_split=split, metric_type=key,
                                          metric_name=f"{split.capitalize()} {key}", metric_value=round(value, 4)))
        if split == "test":
            for kind, value in sorted((report.get("by_interaction") or {}).items()):
                results.append(EvalResult(**common, dataset_split=split, metric_type=primary, metric_config=kind,
                                          metric_name=f"Test {primary} ({kind} samples)",
                                          metric_value=round(float(value), 4)))
    return results


def _dataset_name(dataset: str) -> str:
    from .data.schema import BUILTIN_DATASETS

    if dataset in BUILTIN_DATASETS:
        return f"{dataset} (built into dmil_hf, with ground-truth interaction types)"
    return Path(dataset).name or dataset


def _dataset_prose(dataset: str) -> str:
    from .data.schema import BUILTIN_DATASETS

    name = Path(dataset).name or dataset
    kind = "built-in dataset (it labels every sample with its interaction type)" if dataset in BUILTIN_DATASETS \
        else "dataset"
    return f"the `{name}` {kind}"


def _stage_rows(config) -> list[dict]:
    trains = {1: "encoders, level 1 (task-relevant / -irrelevant latents), unimodal heads",
              2: "level 2 (redundancy, uniqueness, synergy), component heads, gate; level 1 frozen",
              3: "everything"}
    warm_up = getattr(config, "stage1_synergy_weight", 0.0)
    if warm_up:
        trains[1] += f"; synergy component warms up on detached embeddings (weight {warm_up:g})"
    losses = {1: "Σ CE(unimodal) + λ·(KL + reconstruction)" + (" + w·CE(synergy)" if warm_up else ""),
              2: "CE(gated) + λ·(level-2 KLs + alignment) + w·Σ CE(component)",
              3: "CE(gated) + w·Σ CE(unimodal) + λ·KL + level-2 terms + w·Σ CE(component)"}
    return [{"stage": k, "trains": trains[k], "loss": losses[k], "epochs": f"{getattr(config, f'stage{k}_epochs'):g}",
             "learning_rate": f"{getattr(config, f'stage{k}_learning_rate'):g}"} for k in (1, 2, 3)
            if getattr(config, f"stage{k}_epochs") > 0]


def _loss_weights(config) -> list[dict]:
    def per_modality(field):
        return ", ".join(f"{m}: {v:g}" for m, v in config.modality_weights(field).items())

    return [
        {"name": "lamb", "value": f"{config.lamb:g}", "role": "λ, scale of every KL / alignment term"},
        {"name": "kl_scale", "value": f"{config.kl_scale:g}", "role": "extra factor on every KL inside the model"},
        {"name": "level1_kl_weights", "value": per_modality("level1_kl_weights"), "role": "stage 1 KL per modality"},
        {"name": "level1_reconstruction_weights", "value": per_modality("level1_reconstruction_weights"),
         "role": "stage 1 reconstruction per modality"},
        {"name": "stage1_synergy_weight", "value": f"{getattr(config, 'stage1_synergy_weight', 0.0):g}",
         "role": "stage 1 warm-up of the synergy component (detached inputs)"},
        {"name": "stage2_reconstruction_weight", "value": f"{config.stage2_reconstruction_weight:g}",
         "role": "stage 2 rebuild of the task-relevant latents"},
        {"name": "stage2_component_weight", "value": f"{config.stage2_component_weight:g}",
         "role": "stage 2 component heads"},
        {"name": "stage3_unimodal_weight", "value": f"{config.stage3_unimodal_weight:g}",
         "role": "stage 3 unimodal heads"},
        {"name": "stage3_level2_scale", "value": f"{config.stage3_level2_scale:g}", "role": "stage 3 level-2 KLs"},
        {"name": "stage3_component_weight", "value": f"{config.stage3_component_weight:g}",
         "role": "stage 3 component heads"},
        {"name": "stage3_reconstruction_weight", "value": f"{config.stage3_reconstruction_weight:g}",
         "role": "stage 3 reconstructions"},
    ]


def _code_files(model_dir: Path, config, processor: dict | None) -> list[str]:
    """The remote-code files that travel with the model (those in the folder, else the ones save_pretrained writes)."""
    files = sorted(path.name for path in model_dir.glob("*.py"))
    if files:
        return files
    files = ["configuration_dmil.py", "modeling_dmil.py"] + (["baselines.py"] if config.model_type != "dmil" else [])
    return files + (["processing_dmil.py"] if processor is not None else [])


def _processor_info(model_dir: Path) -> dict | None:
    path = model_dir / "processor_config.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _example_inputs(config, processor: dict | None) -> dict:
    """Literal raw example values for the usage snippets (Python source strings), for the modalities the saved
    processor can read."""
    parts = set((processor or {}).get("sub_processors") or ())
    examples = {}
    if "text" in config.modalities and "tokenizer" in parts:
        examples["text"] = '"an example sentence"'
    if "vision" in config.modalities and "image_processor" in parts:
        size = getattr(config.vision_config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        examples["image"] = f"np.zeros(({size}, {size}, 3), dtype=np.uint8)"
    if "audio" in config.modalities and "feature_extractor" in parts:
        rate = (processor.get("feature_extractor") or {}).get("sampling_rate", 16000)
        examples["audio"] = f"np.zeros({rate}, dtype=np.float32)"
        examples["sampling_rate"] = str(rate)
    return examples


def _tensor_examples(config, examples: dict) -> list[tuple[str, str]]:
    """`(input name, torch expression)` for the modalities the processor does not cover, built from the config."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    covered = {"text": "text", "vision": "image", "audio": "audio"}
    tensors = []
    for modality in config.modalities:
        sub = config.tower_config(modality)
        if sub is None:
            tensors.append((f"{modality}_features", f"torch.zeros(1, {config.feature_modalities[modality]})"))
            continue
        if covered[modality] in examples:
            continue
        main = getattr(MODEL_MAPPING[type(sub)], "main_input_name", None) if type(sub) in MODEL_MAPPING else None
        if main == "input_ids":
            tensors.append(("text_input_ids", f"torch.tensor([[{min(101, sub.vocab_size - 1)}, 1, 2]])"))
        elif main == "pixel_values":
            size = getattr(sub, "image_size", 224)
            height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
            tensors.append(("vision_pixel_values",
                            f"torch.zeros(1, {getattr(sub, 'num_channels', 3)}, {height}, {width})"))
        elif main == "input_features":
            bins = getattr(sub, "num_mel_bins", None) or getattr(sub, "feature_size", 80)
            frames = 2 * sub.max_source_positions if hasattr(sub, "max_source_positions") else 100
            tensors.append(("audio_input_features", f"torch.zeros(1, {bins}, {frames})"))
        elif main == "input_values":
            tensors.append(("audio_input_values", "torch.zeros(1, 16000)"))
    return tensors


def _usage_code(config, model_ref: str, revision: str | None, processor: dict | None) -> tuple[str, str]:
    """The Transformers snippet (remote code) and the pipeline snippet of the card, as runnable Python."""
    from jinja2 import Template

    examples = _example_inputs(config, processor)
    features = [(m, config.feature_modalities[m]) for m in config.modalities if m in config.feature_modalities]
    values = dict(repo=json.dumps(model_ref), revision=f", revision={json.dumps(revision)}" if revision else "",
                  ex=examples, features=features, tensors=_tensor_examples(config, examples),
                  has_processor=bool(examples), regression=config.problem_type == "regression",
                  has_weights=config.model_type in ("dmil", "dmil_i2moe"))
    usage, pipe = (Template(text, trim_blocks=True, lstrip_blocks=True).render(**values).strip()
                   for text in (_USAGE_TEMPLATE, _PIPELINE_TEMPLATE))
    return usage, pipe


_USAGE_TEMPLATE = """
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification{% if has_processor %}, AutoProcessor{% endif %}


repo = {{ repo }}
model = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True{{ revision }}).eval()
{% if has_processor %}
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True{{ revision }})
# One sample; batch by passing lists. Leave out any modality you don't have.
inputs = processor(
{% if ex.text %}
    text=[{{ ex.text }}],
{% endif %}
{% if ex.image %}
    images=[{{ ex.image }}],
{% endif %}
{% if ex.audio %}
    audio=[{{ ex.audio }}],
    sampling_rate={{ ex.sampling_rate }},
{% endif %}
    return_tensors="pt",
)
{% else %}
inputs = {}  # one sample; leave out any modality you don't have
{% endif %}
{% for name, value in tensors %}
inputs["{{ name }}"] = {{ value }}
{% endfor %}
with torch.no_grad():
    outputs = model(**inputs)
{% if regression %}
print(outputs.logits[0].item())
{% else %}
print(model.config.id2label[int(outputs.logits[0].argmax())])
{% endif %}
{% if has_weights %}
# Per-sample interaction readout: how much of this prediction is redundant, unique to a modality or synergistic.
print(dict(zip(model.config.component_names, outputs.interaction_weights[0].tolist())))
{% endif %}
"""

_PIPELINE_TEMPLATE = """
import numpy as np
from transformers import pipeline

import dmil_hf  # registers the "multimodal-classification" pipeline

classifier = pipeline("multimodal-classification", model={{ repo }}{{ revision }})
sample = {
{% if ex.text %}
    "text": {{ ex.text }},
{% endif %}
{% if ex.image %}
    "image": {{ ex.image }},  # or a PIL image, or a file path
{% endif %}
{% if ex.audio %}
    "audio": {"array": {{ ex.audio }}, "sampling_rate": {{ ex.sampling_rate }}},  # or a file path
{% endif %}
{% for name, width in features %}
    "{{ name }}_features": np.zeros({{ width }}, dtype=np.float32),
{% endfor %}
}
result = classifier(sample, top_k=3)
print(result["scores"])  # the top labels with their probabilities, highest first
{% if has_weights %}
print(result["interaction_weights"])  # the per-sample interaction readout over the components
{% endif %}
"""


def _evaluation_context(metrics: dict | None, regression: bool) -> dict:
    """Template values for the results tables, and the model-index entries, from a run's metrics."""
    primary = "mse" if regression else "accuracy"
    context = {"results": [], "result_metrics": [], "by_interaction": [], "primary_metric": primary,
               "train_seconds": None, "eval_results": []}
    if not metrics:
        return context
    test = metrics.get("test") or {}
    numeric = [(split, key) for split in ("test", "validation") for key, value in (metrics.get(split) or {}).items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "n"]
    names = list(dict.fromkeys(key for _, key in numeric))
    primary = "accuracy" if "accuracy" in names else (names[0] if names else primary)
    context.update(
        primary_metric=primary, result_metrics=names,
        results=[{"split": split, "n": metrics[split].get("n", ""),
                  "values": [_number(metrics[split].get(key, "")) for key in names]}
                 for split in ("validation", "test") if metrics.get(split)],
        by_interaction=[(kind, _number(float(value))) for kind, value in
                        sorted((test.get("by_interaction") or {}).items())],
        train_seconds=f"{float(metrics['train_seconds']):.1f}" if metrics.get("train_seconds") else None,
        eval_results=_eval_results(metrics, primary),
    )
    return context


def _profile_context(profile: dict | None, config) -> dict:
    """The interaction-profile table: one row per ground-truth type, one column per component."""
    if not profile:
        return {"profile_components": [], "profile_rows": []}
    seen = {name for row in profile.values() for name in row}
    components = [n for n in config.component_names if n in seen] + sorted(seen - set(config.component_names))
    rows = [{"kind": kind, "values": [_number(float(row[n]), 3) if n in row else "–" for n in components]}
            for kind, row in sorted(profile.items())]
    return {"profile_components": components, "profile_rows": rows}


def _training_context(config, metrics: dict | None) -> dict:
    """The stage schedule and loss weights (DMIL) or the single-stage settings (baselines), and the run settings."""
    settings = (metrics or {}).get("settings") or {}
    run_settings = ", ".join(f"{key.replace('_', ' ')} {settings[key]}"
                             for key in ("towers", "batch_size", "seed", "lora")
                             if settings.get(key) not in (None, "", {}))
    parts = [f"{k.replace('_', ' ')} {settings[k]}" for k in ("epochs", "learning_rate") if settings.get(k)]
    if config.model_type == "dmil_i2moe":
        parts += [f"gate temperature {config.i2moe_temperature:g}",
                  f"interaction-loss weight {config.i2moe_interaction_weight:g}"]
    dmil = config.model_type == "dmil"
    return {"stages": _stage_rows(config) if dmil else [], "loss_weights": _loss_weights(config) if dmil else [],
            "optimizer": "AdamW", "method_settings": "" if dmil else ", ".join(parts),
            "run_settings": run_settings}


def render_model_card(model_dir, metrics=None, interaction_profile=None, repo_id: str | None = None,
                      revision: str | None = None, license: str | None = None):
    """
    Render the model card of a saved DMIL (or baseline) model from the template shipped with `dmil_hf`.

    Args:
        model_dir (`str` or `Path`): folder written by `save_pretrained` / `dmil train` (needs `config.json`).
        metrics (`dict` or path, *optional*): the run's metrics (`{"dataset", "seed", "validation", "test":
            {"accuracy", "by_interaction", "n"}, "train_seconds", ...}`); default: `model_dir/metrics.json` if present.
        interaction_profile (`dict` or path, *optional*): `{"<type>": {"<component>": mean weight}}`; default:
            `model_dir/interaction_profile.json` if present.
        repo_id (`str`, *optional*): the Hub repo the card describes (names the model and the usage snippet; the
            snippet uses `model_dir` otherwise).
        revision (`str`, *optional*): branch or tag the snippet loads.
        license (`str`, *optional*): license identifier for the card metadata.

    Returns:
        `huggingface_hub.ModelCard`; `str(card)` is the README.md text.
    """
    from huggingface_hub import ModelCard, ModelCardData
    from transformers import AutoConfig

    from . import DmilConfig  # importing the package registers the dmil model types with AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json; expected a folder written by save_pretrained.")
    config = AutoConfig.from_pretrained(model_dir)
    if not isinstance(config, DmilConfig):
        raise ValueError(f"{model_dir} holds a {type(config).__name__} ({config.model_type!r}), not a dmil_hf model.")
    metrics = _read_json(metrics, model_dir / "metrics.json", "metrics")
    profile = _read_json(interaction_profile, model_dir / "interaction_profile.json", "interaction profile")
    processor = _processor_info(model_dir)
    model_name = repo_id.split("/")[-1] if repo_id else model_dir.resolve().name
    model_ref = repo_id or str(model_dir)
    method_title, method_description = _METHODS.get(config.model_type, (config.model_type, ""))
    towers, base_models, random_towers = _tower_rows(config)
    regression = config.problem_type == "regression"

    evaluation = _evaluation_context(metrics, regression)
    primary, eval_results = evaluation["primary_metric"], evaluation.pop("eval_results")
    dataset = str((metrics or {}).get("dataset") or "") or None

    tags = list(CARD_TAGS) + [m for m in ("text", "vision", "audio") if m in config.modalities]
    if config.feature_modalities:
        tags.append("precomputed-features")
    if config.model_type != "dmil":
        tags.append(config.model_type.replace("_", "-"))
    datasets = [dataset] if _is_hub_id(dataset) else None
    card_data = ModelCardData(
        library_name="transformers", tags=tags, datasets=datasets,
        base_model=base_models[0] if len(base_models) == 1 else base_models or None,
        metrics=[primary] if metrics else None, license=license,
        model_name=model_name if eval_results else None, eval_results=eval_results or None,
    )
    usage_code, pipeline_code = _usage_code(config, model_ref, revision, processor)
    labels = [str(config.id2label.get(i, i)) for i in range(config.num_labels)]
    label_list = ", ".join(labels[:20]) + (f", … ({len(labels) - 20} more)" if len(labels) > 20 else "")
    modality_list = ", ".join(config.modalities)
    article = "An" if method_title[0] in "AEIO" else "A"
    summary = (f"{article} {method_title} classifier over {len(config.modalities)} modalities ({modality_list})"
               + (f", trained on {_dataset_prose(dataset)}." if dataset else "."))
    template_kwargs = dict(
        model_name=model_name, summary=summary, method_description=method_description, towers=towers,
        code_files=", ".join(f"`{name}`" for name in _code_files(model_dir, config, processor)),
        regression=regression, num_labels=config.num_labels, label_list=label_list,
        hidden_size=config.hidden_size, latent_size=config.latent_size,
        interaction_components=", ".join(f"`{n}`" for n in config.component_names)
        if config.model_type in ("dmil", "dmil_i2moe") else "",
        usage_code=usage_code, pipeline_code=pipeline_code,
        dataset_description=_dataset_prose(dataset) if dataset else "its dataset", seed=(metrics or {}).get("seed"),
        plot_file="interaction_weights.png" if (model_dir / "interaction_weights.png").exists() else None,
        random_towers=", ".join(random_towers), citation=PAPER_CITATION,
        **evaluation, **_profile_context(profile, config), **_training_context(config, metrics),
    )
    return ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), **template_kwargs)


def write_model_card(model_dir, **kwargs) -> Path:
    """Render the card of `model_dir` (see `render_model_card` for `kwargs`) and write it to `model_dir/README.md`.
    The trainer calls this before `push_to_hub`."""
    card = render_model_card(model_dir, **kwargs)
    path = Path(model_dir) / "README.md"
    path.write_text(str(card), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ export


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


_RELOAD_SCRIPT = r'''
import json, sys
sys.modules["dmil_hf"] = None  # the export must load from its own files, never from the installed package
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

folder, work = sys.argv[1], sys.argv[2]
model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
info = {"model_class": f"{type(model).__module__}.{type(model).__qualname__}"}
flat = load_file(f"{work}/inputs.safetensors")
cases = {}
for key, value in flat.items():
    case, name = key.split("/", 1)
    cases.setdefault(case, {})[name] = value
outputs = {}
with torch.no_grad():
    for case, inputs in cases.items():
        out = model(**inputs)
        for name in ("logits", "interaction_weights"):
            if getattr(out, name, None) is not None:
                outputs[f"{case}/{name}"] = getattr(out, name).contiguous()
with open(f"{work}/processor.json") as handle:
    sample = json.load(handle)
if sample is not None:
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    info["processor_class"] = f"{type(processor).__module__}.{type(processor).__qualname__}"
    arrays = dict(np.load(f"{work}/processor_arrays.npz"))
    if "images" in arrays:
        arrays["images"] = list(arrays["images"])
    if "audio" in arrays:
        arrays["audio"] = list(arrays["audio"])
    for key, value in processor(**sample, **arrays, return_tensors="pt").items():
        outputs[f"processor/{key}"] = value.contiguous()
save_file(outputs, f"{work}/outputs.safetensors")
with open(f"{work}/info.json", "w") as handle:
    json.dump(info, handle)
'''


def _reload_in_fresh_process(output_dir: Path, cases: dict, processor_sample, timeout: float) -> tuple[dict, dict]:
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
            result = subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, str(output_dir.resolve()), str(work)],
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

    from .loading import load_model

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


# ------------------------------------------------------------------------------------------------ push


class HubUnreachableError(ConnectionError):
    """The Hub cannot be reached (offline mode, no network) or refuses the token; raised before any work is done."""


def check_hub_reachable(token: str) -> str:
    """Ask the Hub who `token` belongs to; returns the user name, or raises `HubUnreachableError` in one line."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        info = HfApi(token=token).whoami()
    except OfflineModeIsEnabled:
        raise HubUnreachableError(f"the Hub ({constants.ENDPOINT}) cannot be reached: offline mode is on "
                                  "(HF_HUB_OFFLINE=1); unset it to push.") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise HubUnreachableError(f"the Hub ({constants.ENDPOINT}) refused the token (HTTP {status}); check it with "
                                  "`hf auth whoami` or log in again with `hf auth login`.") from None
    except (OSError, ValueError) as err:  # connection refused, DNS, timeouts (requests / httpx errors are OSErrors)
        raise HubUnreachableError(f"the Hub ({constants.ENDPOINT}) cannot be reached with this token: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    except Exception as err:  # httpx' transport errors are not OSErrors
        if not type(err).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):  # httpx2, httpcore2 too
            raise
        raise HubUnreachableError(f"the Hub ({constants.ENDPOINT}) cannot be reached with this token: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return info.get("name", "") if isinstance(info, dict) else ""


def check_push_target(repo_id, token: str | None = None, create_pr: bool = False,
                      revision: str | None = None, check_reachable: bool = True) -> str:
    """Validate a push before any work is done (a training run checks this first): the repo id, the token, and
    (`check_reachable`) that the Hub answers to that token. Returns the token to use."""
    from huggingface_hub import get_token

    if not isinstance(repo_id, str) or not _HUB_ID.match(repo_id):
        raise ValueError(f"repo_id {repo_id!r} must look like 'user/name' or 'org/name'.")
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"create_pr=True opens a pull request against the default branch; revision {revision!r} "
                         "cannot be combined with it.")
    token = token or get_token()
    if token is None:
        raise ValueError("no Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass token= (--token).")
    if check_reachable:
        check_hub_reachable(token)
    return token


def push_model(model_dir, repo_id: str, private: bool = False, create_pr: bool = False, revision: str | None = None,
               token: str | None = None, commit_message: str | None = None, allow_pickle: bool = False) -> str:
    """
    Export `model_dir` to a temporary folder (running the fresh-process reload check), then create `repo_id` on the
    Hub if needed and upload the folder as one commit.

    Args:
        model_dir: folder written by `save_pretrained` / `dmil train`.
        repo_id: `user/name` or `org/name`.
        private: create the repo private (ignored when it already exists).
        create_pr: open a pull request instead of committing to the branch.
        revision: branch to commit to (created from the default branch if missing); the card's snippet loads it.
        token: a Hub token with write access; default: the one `hf auth login` saved, or `HF_TOKEN`.
        commit_message: default "Upload <method> model".
        allow_pickle: also load pickle weights (the upload is safetensors).

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    token = check_push_target(repo_id, token, create_pr, revision)
    with tempfile.TemporaryDirectory(prefix="dmil-push-") as tmp:
        folder = Path(tmp) / repo_id.split("/")[-1]
        report = export_model(model_dir, folder, allow_pickle=allow_pickle, repo_id=repo_id, revision=revision)
        config = json.loads((folder / "config.json").read_text())
        method = _METHODS.get(config.get("model_type"), (config.get("model_type"),))[0]
        api = HfApi(token=token)
        # private=None leaves a new repo to the namespace's default visibility (public unless the org says otherwise).
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        if revision not in (None, "main") and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or f"Upload {method} model")
    logger.info(f"Pushed {len(report['files'])} files to {repo_id}: {info.commit_url}"
                + (f" (pull request {info.pr_url})" if info.pr_url else ""))
    return info.commit_url


__all__ = [
    "CARD_TAGS",
    "ExportCheckError",
    "HubUnreachableError",
    "PAPER_CITATION",
    "TEMPLATE_PATH",
    "check_hub_reachable",
    "check_inputs",
    "check_push_target",
    "export_model",
    "push_model",
    "render_model_card",
    "write_model_card",
]
