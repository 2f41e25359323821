"""The registry of training methods: DMIL and the baselines it is compared with.

Each method is registered once, with its name (what `dmil train --method` takes), title and description (what the
model card says), its config and model classes, and how `dmil_hf.training` drives it. The CLI choices, the benchmark,
the model card and `build_model` all read this registry, as timm's `register_model` registry serves `create_model`.

Example:
```python
>>> from dmil_hf.methods import METHODS, get_method
>>> list(METHODS)
['dmil', 'joint', 'ensemble', 'i2moe']
>>> get_method("dmil_i2moe").name  # by name or by the checkpoint's model_type
'i2moe'
```
"""

from __future__ import annotations

from dataclasses import dataclass

from .baselines import (
    DmilEnsembleConfig,
    DmilEnsembleForMultimodalClassification,
    DmilI2moeConfig,
    DmilI2moeForMultimodalClassification,
    DmilJointConfig,
    DmilJointForMultimodalClassification,
)
from .configuration_dmil import DmilConfig
from .modeling_dmil import DmilForMultimodalClassification, DmilPreTrainedModel

# Keys of a saved config that describe where it came from, not what it is: dropped when converting between methods.
_PROVENANCE_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes:
        name: what `dmil train --method` and `build_model` take.
        title / description: how the model card names and explains it.
        config_class / model_class: the classes `build_model` instantiates (`config_class.model_type` is the
            checkpoint's `model_type`).
        staged: trained in DMIL's three stages (`model.set_training_stage`); otherwise in one run.
        max_grad_norm: replaces `TrainingArguments.max_grad_norm` for this method (0 turns clipping off); None
            keeps the arguments' value.
        interaction_weights: its outputs carry per-sample `interaction_weights` (the card describes them).
        card_settings: the method's own config fields the model card lists, as (field, label) pairs.
        train_corruption: the share of training rows `dmil train` copies with each modality corrupted
            (`dmil_hf.data.add_training_corruption`) unless told otherwise; 0 trains on the clean rows only.
    """

    name: str
    title: str
    description: str
    config_class: type[DmilConfig]
    model_class: type[DmilPreTrainedModel]
    staged: bool = False
    max_grad_norm: float | None = None
    interaction_weights: bool = False
    card_settings: tuple[tuple[str, str], ...] = ()
    train_corruption: float = 0.0

    @property
    def model_type(self) -> str:
        return self.config_class.model_type


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add `method` to `METHODS`; its name and model type must be new."""
    taken = {m.model_type for m in METHODS.values()}
    if method.name in METHODS or method.model_type in taken:
        raise ValueError(f"a method named {method.name!r} or of model type {method.model_type!r} is already "
                         f"registered: {list(METHODS)}.")
    METHODS[method.name] = method
    return method


def get_method(name_or_model_type: str) -> Method:
    """The registered method called `name_or_model_type` (e.g. `"joint"`), or whose config has that `model_type`
    (e.g. `"dmil_joint"`)."""
    if name_or_model_type in METHODS:
        return METHODS[name_or_model_type]
    for method in METHODS.values():
        if method.model_type == name_or_model_type:
            return method
    raise ValueError(f"method {name_or_model_type!r} is unknown; expected one of {list(METHODS)}.")


def method_of(model_or_config) -> Method | None:
    """The registered method of a model or config (by its `model_type`), or None for a model of another kind."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    return next((m for m in METHODS.values() if m.model_type == model_type), None)


def build_model(method: str, config: DmilConfig, towers: dict | None = None) -> DmilPreTrainedModel:
    """
    A freshly initialised model of `method` (a name in `METHODS`: `"dmil"`, `"joint"`, `"ensemble"`, `"i2moe"`)
    with the towers, sizes and labels of `config` (any [`DmilConfig`]; it is converted to the method's config class).
    `towers`: already built towers by modality (e.g. pretrained ones), used as they are instead of random ones.

    Example:
    ```python
    >>> model = build_model("i2moe", DmilConfig(feature_modalities={"a": 3, "b": 4}, num_labels=2))
    >>> type(model).__name__, model.config.model_type
    ('DmilI2moeForMultimodalClassification', 'dmil_i2moe')
    ```
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; expected one of {list(METHODS)}.")
    if not isinstance(config, DmilConfig):
        raise TypeError(f"config must be a DmilConfig; got {type(config).__name__}.")
    entry = METHODS[method]
    if type(config) is not entry.config_class:
        values = {k: v for k, v in config.to_dict().items() if k not in _PROVENANCE_KEYS}
        # from_dict, not the constructor: the other method's own fields (e.g. i2moe_*) are carried, not refused.
        config = entry.config_class.from_dict(values)
    return entry.model_class(config, towers=towers)


register_method(Method(
    "dmil", "DMIL",
    "Decomposition-based Multimodal Interaction Learning (Yang et al., CVPR 2026): every sample is decomposed into a "
    "redundant component, one unique component per modality and a synergistic component, each with its own "
    "classifier head, and a per-sample gate weights their predictions.",
    DmilConfig, DmilForMultimodalClassification, staged=True, interaction_weights=True, train_corruption=0.15))
register_method(Method(
    "joint", "joint-fusion baseline",
    "the pooled modality embeddings are concatenated and classified by one MLP trained end to end (the DMIL paper's "
    "joint-learning baseline).",
    DmilJointConfig, DmilJointForMultimodalClassification))
# Clipping by the global norm would couple the ensemble's independent unimodal models (one model's large gradient
# would shrink the others' steps): clip per model or not at all.
register_method(Method(
    "ensemble", "unimodal-ensemble baseline",
    "one classifier per modality, each trained on its own modality only; the prediction averages their "
    "probabilities (the DMIL paper's ensemble baseline).",
    DmilEnsembleConfig, DmilEnsembleForMultimodalClassification, max_grad_norm=0.0))
register_method(Method(
    "i2moe", "I2MoE-style baseline",
    "interaction experts (one unique per modality, one synergy, one redundancy) with a reweighting gate and "
    "perturbation-based interaction losses (after Xin et al., ICML 2025).",
    DmilI2moeConfig, DmilI2moeForMultimodalClassification, interaction_weights=True,
    card_settings=(("i2moe_temperature", "gate temperature"), ("i2moe_interaction_weight", "interaction-loss weight"))))


__all__ = ["METHODS", "Method", "build_model", "get_method", "method_of", "register_method"]
