# Travels to the Hub with a baseline checkpoint: imports only the standard library, torch, transformers and
# its sibling files (relatively).
"""
The baselines DMIL is compared with, on the same towers and data path: late-fusion `joint`, a unimodal
`ensemble`, and `i2moe` (Xin et al., ICML 2025, "I2MoE: Interpretable Multimodal Interaction-aware
Mixture-of-Experts"). Each reuses [`DmilEncoders`], takes the same prefixed keyword inputs and `labels`, and returns
a [`DmilClassifierOutput`]; each has its own config class (only `model_type` differs) so that
`AutoModelForSequenceClassification.from_pretrained` rebuilds the right model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .configuration_dmil import DmilConfig
from .modeling_dmil import (
    DmilClassifierOutput,
    DmilEncoders,
    DmilForMultimodalClassification,
    DmilPreTrainedModel,
    drop_modalities,
    masked_mean,
    problem_type,
)

# A config subclass needs its own `__init__`: transformers wraps subclasses without one in a dataclass `__init__`
# that would bypass `DmilConfig.__init__` (and with it the sub-config parsing). `model_type` is a class attribute;
# a saved dict passes it back as a keyword, which must not shadow the class's value.
class DmilJointConfig(DmilConfig):
    """[`DmilConfig`] of the late-fusion baseline [`DmilJointForMultimodalClassification`]; same fields."""

    model_type = "dmil_joint"

    def __init__(self, **kwargs):
        kwargs.pop("model_type", None)
        super().__init__(**kwargs)


class DmilEnsembleConfig(DmilConfig):
    """[`DmilConfig`] of the unimodal-ensemble baseline [`DmilEnsembleForMultimodalClassification`]; same fields."""

    model_type = "dmil_ensemble"

    def __init__(self, **kwargs):
        kwargs.pop("model_type", None)
        super().__init__(**kwargs)


class DmilI2moeConfig(DmilConfig):
    r"""
    [`DmilConfig`] of [`DmilI2moeForMultimodalClassification`], plus:

    Args:
        i2moe_temperature (`float`, defaults to 1.5): temperature of the softmax over the expert weights.
        i2moe_interaction_weight (`float`, defaults to 0.1): λ, the weight of the mean interaction loss.
    """

    model_type = "dmil_i2moe"

    def __init__(self, i2moe_temperature: float = 1.5, i2moe_interaction_weight: float = 0.1, **kwargs):
        kwargs.pop("model_type", None)
        if float(i2moe_temperature) <= 0:
            raise ValueError(f"`i2moe_temperature` is {i2moe_temperature}; expected a positive number.")
        if float(i2moe_interaction_weight) < 0:
            raise ValueError(f"`i2moe_interaction_weight` is {i2moe_interaction_weight}; expected a number >= 0.")
        self.i2moe_temperature = float(i2moe_temperature)
        self.i2moe_interaction_weight = float(i2moe_interaction_weight)
        super().__init__(**kwargs)


def _classifier(input_size: int, hidden_size: int, output_size: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(input_size, hidden_size), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden_size, output_size))


class _DmilBaselineModel(DmilPreTrainedModel):
    """Shared by the baselines: the towers (`self.encoders`), label checks and the per-sample task loss."""

    # The same checks and loss as DMIL, so every method is trained on exactly the same objective per head.
    _check_labels = DmilForMultimodalClassification._check_labels
    _check_multi_hot_labels = DmilForMultimodalClassification._check_multi_hot_labels
    _task_loss = DmilForMultimodalClassification._task_loss

    def __init__(self, config: DmilConfig, towers: dict[str, nn.Module] | None = None):
        super().__init__(config)
        self.num_labels = config.num_labels
        # Top-level `encoders` (no `dmil` attribute): `model.base_model` is the model itself, so
        # `model.base_model.encoders` reaches the towers as it does for DMIL. `towers`: already built towers by
        # modality (see [`DmilEncoders`]), e.g. pretrained ones.
        self.encoders = DmilEncoders(config, towers)

    def _encode(self, inputs, labels, modality_mask, return_dict, output_hidden_states, output_attentions):
        """Label checks and the towers, with the output options resolved against the config."""
        options = self._output_options(return_dict, output_hidden_states, output_attentions)
        if labels is not None:
            self._check_labels(labels, inputs)
        embeds, mask, tower_outputs = self.encoders.encode(inputs, modality_mask, *options[1:])
        if self.training and self.config.modality_dropout_probability > 0:  # the practitioner's modality dropout
            mask = drop_modalities(mask, self.config.modality_dropout_probability)
            embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        return options[0], embeds, mask, {f"{m}_model_output": out for m, out in tower_outputs.items()}

    @staticmethod
    def _finish(output: DmilClassifierOutput, return_dict: bool):
        return output if return_dict else output.to_tuple()


class DmilJointForMultimodalClassification(_DmilBaselineModel):
    r"""
    Late fusion: the pooled modality embeddings (absent modalities zeroed) are concatenated and classified by one
    MLP (`num_modalities · hidden_size → hidden_size → num_labels`), trained end to end with DMIL's task loss
    (cross-entropy; binary cross-entropy per label for `problem_type="multi_label_classification"`, squared error
    for `"regression"`).

    Example:
    ```python
    >>> from dmil_hf.towers import tower_configs
    >>> config = DmilJointConfig(**tower_configs(["text", "vision"]), num_labels=3)
    >>> model = DmilJointForMultimodalClassification(config)
    >>> inputs = dict(text_input_ids=torch.ones(2, 5, dtype=torch.long), vision_pixel_values=torch.rand(2, 1, 16, 16))
    >>> model(**inputs).logits.shape
    torch.Size([2, 3])
    ```
    """

    config_class = DmilJointConfig

    def __init__(self, config: DmilJointConfig, towers: dict[str, nn.Module] | None = None):
        super().__init__(config, towers)
        num = len(config.modalities)
        self.classifier = _classifier(num * config.hidden_size, config.hidden_size, config.num_labels, config.dropout)
        self.post_init()

    def forward(self, modality_mask=None, modality_corruption=None, labels=None, return_dict=None,
                output_hidden_states=None, output_attentions=None, **inputs) -> DmilClassifierOutput | tuple:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class ids (floats for regression;
                multi-hot `(batch_size, num_labels)` for multi-label).
            modality_mask (`torch.BoolTensor` of shape `(batch_size, num_modalities)`, *optional*): per-sample presence.
            modality_corruption: accepted for a shared data path (training corruption levels); unused.
            return_dict, output_hidden_states, output_attentions: as for [`DmilForMultimodalClassification`].
            **inputs: modality-prefixed tower inputs, as for [`DmilForMultimodalClassification`].
        """
        return_dict, embeds, mask, tower_outputs = self._encode(
            inputs, labels, modality_mask, return_dict, output_hidden_states, output_attentions)
        logits = self.classifier(embeds.flatten(1))
        loss, terms = None, {}
        if labels is not None:
            terms["task"] = loss = self._task_loss(logits, labels).mean()
        return self._finish(DmilClassifierOutput(loss=loss, logits=logits, modality_embeds=embeds, modality_mask=mask,
                                                 loss_terms=terms, **tower_outputs), return_dict)


class DmilEnsembleForMultimodalClassification(_DmilBaselineModel):
    r"""
    Unimodal ensemble: one classifier MLP per modality (`hidden_size → hidden_size → num_labels`) on that modality's
    embedding only. The loss is the sum over modalities of each unimodal loss (over the samples where the modality is
    present). Towers, projections and heads of different modalities share no parameter, so minimising the sum trains
    the unimodal models exactly as if separately: the gradient of each one's parameters comes from its own loss only.

    Prediction: the mean of the present modalities' softmax probabilities; `logits` is the log of that mean, so
    `logits.argmax(-1)` and `logits.softmax(-1)` give the ensemble's class and probabilities (multi-label: the mean of
    each label's sigmoid probabilities, `logits` their logit, so `logits.sigmoid()` is that mean; regression: the
    mean of the present modalities' predictions).

    Gradient clipping by the global norm would couple the unimodal models (one model's large gradient would shrink
    the others' steps): its entry in `dmil_hf.methods` turns Trainer's clipping off (`max_grad_norm=0`).
    """

    config_class = DmilEnsembleConfig

    def __init__(self, config: DmilEnsembleConfig, towers: dict[str, nn.Module] | None = None):
        super().__init__(config, towers)
        hidden = config.hidden_size
        self.unimodal_heads = nn.ModuleDict(
            {m: _classifier(hidden, hidden, config.num_labels, config.dropout) for m in config.modalities})
        self.post_init()

    def forward(self, modality_mask=None, modality_corruption=None, labels=None, return_dict=None,
                output_hidden_states=None, output_attentions=None, **inputs) -> DmilClassifierOutput | tuple:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class ids (floats for regression;
                multi-hot `(batch_size, num_labels)` for multi-label).
            modality_mask (`torch.BoolTensor` of shape `(batch_size, num_modalities)`, *optional*): per-sample presence.
            modality_corruption: accepted for a shared data path (training corruption levels); unused.
            return_dict, output_hidden_states, output_attentions: as for [`DmilForMultimodalClassification`].
            **inputs: modality-prefixed tower inputs, as for [`DmilForMultimodalClassification`].
        """
        return_dict, embeds, mask, tower_outputs = self._encode(
            inputs, labels, modality_mask, return_dict, output_hidden_states, output_attentions)
        modalities = self.config.modalities
        unimodal_logits = torch.stack([self.unimodal_heads[m](embeds[:, i]) for i, m in enumerate(modalities)], 1)
        present = mask.unsqueeze(-1)
        count = mask.sum(1, keepdim=True).to(unimodal_logits.dtype)
        kind = problem_type(self.config)
        if kind == "regression":
            logits = (unimodal_logits * present.to(unimodal_logits.dtype)).sum(1) / count
        elif kind == "multi_label_classification":
            # logit(mean_m sigmoid_m) = log(mean_m σ(l_m)) − log(mean_m σ(−l_m)), stably over the present modalities.
            def log_mean(log_probs):
                return log_probs.masked_fill(~present, float("-inf")).logsumexp(1) - count.log()

            logits = log_mean(F.logsigmoid(unimodal_logits)) - log_mean(F.logsigmoid(-unimodal_logits))
        else:
            # log(mean_m softmax_m) computed stably over the present modalities only.
            log_probs = unimodal_logits.log_softmax(-1).masked_fill(~present, float("-inf"))
            logits = log_probs.logsumexp(1) - count.log()
        loss, terms = None, {}
        if labels is not None:
            for i, m in enumerate(modalities):
                terms[f"task_unimodal_{m}"] = masked_mean(self._task_loss(unimodal_logits[:, i], labels), mask[:, i])
            loss = sum(terms.values())
        return self._finish(DmilClassifierOutput(
            loss=loss, logits=logits, unimodal_logits=unimodal_logits, modality_embeds=embeds, modality_mask=mask,
            loss_terms=terms, **tower_outputs), return_dict)


class DmilI2moeForMultimodalClassification(_DmilBaselineModel):
    r"""
    I2MoE (Xin et al., ICML 2025) on DMIL's towers: `num_modalities + 2` interaction experts, in the order of
    `config.component_names` (redundancy, one uniqueness expert per modality, synergy). Each expert is a fusion MLP
    over the concatenated modality embeddings (`num_modalities · hidden_size → hidden_size → hidden_size`) with its
    own linear head; a reweighting MLP over the same concatenation gives per-sample softmax weights (temperature
    `config.i2moe_temperature`), and the logits are the weighted sum of the experts' logits.

    With `labels`, the interaction losses come from replacing one modality's embedding with N(0, 1) noise (one
    perturbed copy per modality; the towers run once, the experts once on the full and the `num_modalities`
    perturbed copies stacked together). On the experts' fusion outputs:
    - `unique_<m>`: triplet loss (margin 1), anchor = full input, negative = `m` replaced, positive = another modality
      replaced (averaged over the other modalities);
    - `synergy`: cosine similarity between full and perturbed outputs (minimised; mean over modalities);
    - `redundancy`: 1 − that cosine similarity.
    Loss = task + `config.i2moe_interaction_weight` · mean of the `num_modalities + 2` interaction losses.

    Missing modalities: the uniqueness expert of an absent modality, and the synergy expert when fewer than two
    modalities remain, get weight 0 (the others are renormalised), as in DMIL, and are left out of the interaction
    losses for those samples.

    Differences from the reference code: the interaction losses act on the experts' fusion outputs (width
    `hidden_size`) rather than on their logits, so they are also defined for regression and binary heads; all experts
    see the same noise draw in a step.
    """

    config_class = DmilI2moeConfig

    def __init__(self, config: DmilI2moeConfig, towers: dict[str, nn.Module] | None = None):
        super().__init__(config, towers)
        num, hidden = len(config.modalities), config.hidden_size
        names = config.component_names
        self.experts = nn.ModuleList([_classifier(num * hidden, hidden, hidden, config.dropout) for _ in names])
        self.expert_heads = nn.ModuleList([nn.Linear(hidden, config.num_labels) for _ in names])
        self.reweight = _classifier(num * hidden, config.gate_hidden_size, len(names), config.dropout)
        self.triplet = nn.TripletMarginLoss(margin=1.0, reduction="none")
        self.post_init()

    def forward(self, modality_mask=None, modality_corruption=None, labels=None, return_dict=None,
                output_hidden_states=None, output_attentions=None, **inputs) -> DmilClassifierOutput | tuple:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class ids (floats for regression;
                multi-hot `(batch_size, num_labels)` for multi-label); with labels the interaction losses are
                computed (in eval mode too, so `loss` has a small random part).
            modality_mask (`torch.BoolTensor` of shape `(batch_size, num_modalities)`, *optional*): per-sample presence.
            modality_corruption: accepted for a shared data path (training corruption levels); unused.
            return_dict, output_hidden_states, output_attentions: as for [`DmilForMultimodalClassification`].
            **inputs: modality-prefixed tower inputs, as for [`DmilForMultimodalClassification`].
        """
        return_dict, embeds, mask, tower_outputs = self._encode(
            inputs, labels, modality_mask, return_dict, output_hidden_states, output_attentions)
        config = self.config
        batch, num = embeds.shape[:2]
        variants = [embeds]
        if labels is not None:
            # Copy 1 + m has the embedding of modality m replaced by N(0, 1) noise; the towers are not re-run.
            variants += [torch.cat([embeds[:, :m], torch.randn_like(embeds[:, m:m + 1]), embeds[:, m + 1:]], 1)
                         for m in range(num)]
        stacked = torch.cat(variants, 0).flatten(1)
        expert_outputs = torch.stack([expert(stacked) for expert in self.experts], 1)  # (V·B, M+2, hidden)
        expert_outputs = expert_outputs.view(len(variants), batch, *expert_outputs.shape[1:])
        component_embeds = expert_outputs[0]
        component_logits = torch.stack([head(component_embeds[:, k]) for k, head in enumerate(self.expert_heads)], 1)

        pairs_present = mask.sum(1) >= 2  # as in DMIL: synergy needs two modalities, not all of them
        component_mask = torch.cat([torch.ones_like(pairs_present).unsqueeze(1), mask, pairs_present.unsqueeze(1)], 1)
        gate_logits = self.reweight(embeds.flatten(1)) / getattr(config, "i2moe_temperature", 1.5)
        weights = gate_logits.masked_fill(~component_mask, float("-inf")).softmax(-1)
        logits = (weights.unsqueeze(-1) * component_logits).sum(1)

        loss, terms = None, {}
        if labels is not None:
            terms["task"] = self._task_loss(logits, labels).mean()
            interaction = self._interaction_losses(expert_outputs, mask)
            terms.update(interaction)
            loss = terms["task"] + getattr(config, "i2moe_interaction_weight", 0.1) * torch.stack(
                list(interaction.values())).mean()
        return self._finish(DmilClassifierOutput(
            loss=loss,
            logits=logits,
            interaction_weights=weights,
            component_logits=component_logits,
            component_embeds=component_embeds,
            modality_embeds=embeds,
            modality_mask=mask,
            loss_terms=terms,
            component_names=config.component_names,
            **tower_outputs,
        ), return_dict)

    def _interaction_losses(self, expert_outputs, mask) -> dict[str, torch.Tensor]:
        """`expert_outputs` (1 + M, B, M + 2, hidden): full input, then modality m replaced; `mask` (B, M)."""
        modalities = self.config.modalities
        num = len(modalities)
        maskf = mask.to(expert_outputs.dtype)
        terms = {}
        for i, m in enumerate(modalities):
            outputs = expert_outputs[:, :, 1 + i]  # the uniqueness expert of m
            anchor, negative = outputs[0], outputs[1 + i]
            others = [j for j in range(num) if j != i]
            triplets = torch.stack([self.triplet(anchor, outputs[1 + j], negative) for j in others], 1)
            terms[f"interaction_unique_{m}"] = masked_mean(triplets.mean(1), mask[:, i])
        cosine = F.cosine_similarity(expert_outputs[:1], expert_outputs[1:], dim=-1)  # (M, B, M + 2)
        per_modality = maskf.t()  # (M, B): modality m replaced only where it was present
        synergy = (cosine[..., -1] * per_modality).sum(0) / per_modality.sum(0).clamp(min=1.0)
        redundancy = ((1 - cosine[..., 0]) * per_modality).sum(0) / per_modality.sum(0).clamp(min=1.0)
        terms["interaction_synergy"] = masked_mean(synergy, mask.all(1))
        terms["interaction_redundancy"] = redundancy.mean()
        return terms


__all__ = [
    "DmilEnsembleConfig",
    "DmilEnsembleForMultimodalClassification",
    "DmilI2moeConfig",
    "DmilI2moeForMultimodalClassification",
    "DmilJointConfig",
    "DmilJointForMultimodalClassification",
]
