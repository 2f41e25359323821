# Travels to the Hub with every checkpoint: imports only the standard library, torch, transformers and
# its sibling files (relatively).
"""DMIL models: modality towers, the two-level variational decomposition and the gated classifier."""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import struct
import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import MODEL_MAPPING, AutoModel, PreTrainedModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.utils import ModelOutput, logging

from .configuration_dmil import CORRUPTION_INPUT, FEATURES, TOWER_MODALITIES, TOWERS, DmilConfig

logger = logging.get_logger(__name__)

# Expected rank of each tower's main input (batch first).
_MAIN_INPUT_RANK = {name: rank for tower in TOWERS.values() for name, rank in tower.main_inputs.items()}
# Inputs that must be floating point (an integer tensor there is raw data: uint8 pixels, int16 PCM).
_FLOAT_INPUTS = tuple(name for tower in TOWERS.values() for name in tower.float_inputs) + (FEATURES,)
# Name (after the modality prefix) of a tower's precomputed pooled output, `(batch, tower width)`: given instead of
# the tower's own inputs, it skips the tower (the frozen-tower embedding cache feeds it; see `DmilEncoders.encode`).
TOWER_EMBEDS = "tower_embeds"
# Largest magnitude accepted in a floating-point input. Normalised model inputs are a few units; far beyond this, a
# tower's LayerNorm squares values past float32's range and returns NaN (pixel values of 1e30 did) with no error.
MAX_INPUT_MAGNITUDE = 1e6


def value_checks_enabled(config, *tensors) -> bool:
    """
    Whether `forward` reads tensor values to check them (finite, magnitude, id and label ranges). Never under
    `torch.compile`, `torch.export` or tracing (the checks are data-dependent); otherwise as
    `config.check_input_values` says: `None` only for CPU tensors (no device-to-host sync), `True` always.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    setting = getattr(config, "check_input_values", None)
    if setting is None:
        return all(t.device.type == "cpu" for t in tensors)
    return bool(setting)


def problem_type(config) -> str:
    """`config.problem_type`, or what transformers infers without one (from the config alone): regression for
    `num_labels == 1`, else single-label classification. Multi-label classification must be set explicitly."""
    if config.problem_type is not None:
        return config.problem_type
    return "regression" if config.num_labels == 1 else "single_label_classification"


# The output field holding each transformers tower's own output, as CLIP's `text_model_output` / `vision_model_output`.
TOWER_OUTPUTS = tuple(f"{m}_model_output" for m in TOWER_MODALITIES)


class _DmilOutput(ModelOutput):
    """As CLIP's outputs: in the tuple form, each tower's output (a `ModelOutput` itself) is a tuple too."""

    def to_tuple(self) -> tuple:
        return tuple(self[k].to_tuple() if k in TOWER_OUTPUTS else self[k] for k in self.keys())


@dataclass
class DmilModelOutput(_DmilOutput):
    """
    Output of [`DmilModel`]: the decomposed representation of every sample. As a tuple (`return_dict=False`) the
    fields that are not None come in this order, the component embeddings first (each `<modality>_model_output` as a
    tuple of its own).

    Args:
        component_embeds (`torch.FloatTensor` of shape `(batch_size, num_modalities + 2, latent_size)`):
            redundancy, one uniqueness per modality, synergy, in the order of `component_names`.
        component_mask (`torch.BoolTensor` of shape `(batch_size, num_modalities + 2)`): which components exist
            for each sample (those needing an absent modality do not).
        modality_embeds (`torch.FloatTensor` of shape `(batch_size, num_modalities, hidden_size)`): projected towers.
        modality_mask (`torch.BoolTensor` of shape `(batch_size, num_modalities)`): which modalities are present.
        modality_reliability (`torch.FloatTensor` of shape `(batch_size, num_modalities)`): how far each present
            modality of each sample can be trusted, in [0, 1] (0 for absent ones; see [`DmilReliability`]).
        task_relevant_embeds / task_irrelevant_embeds (`torch.FloatTensor` of shape
            `(batch_size, num_modalities, latent_size)`): level-1 latents (samples in training, means in eval).
        synergy_pair_embeds (`torch.FloatTensor` of shape `(batch_size, num_pairs, latent_size)`, with
            `synergy_structure="pairs"`): the synergy component's latent of each pair of modalities, pairs in the
            order (0, 1), (0, 2), ..., (1, 2), ... of `config.modalities`.
        synergy_pair_mask (`torch.BoolTensor` of shape `(batch_size, num_pairs)`, with `synergy_structure="pairs"`):
            which pairs have both modalities present.
        synergy_subset_embeds (`torch.FloatTensor` of shape `(batch_size, num_modalities, latent_size)`, in training
            with `config.synergy_subset_weight > 0`): the synergy component's latent with modality `k` left out (read
            as missing), for each `k` of `config.modalities`.
        synergy_subset_mask (`torch.BoolTensor` of shape `(batch_size, num_modalities)`, with
            `synergy_subset_embeds`): which of those subsets keep two present modalities.
        text_model_output / vision_model_output / audio_model_output (`ModelOutput`, returned with
            `output_hidden_states` or `output_attentions`): that transformers tower's own output (`last_hidden_state`,
            its `hidden_states`: the embeddings, then one per layer, and its `attentions`), as CLIP returns its
            towers'. Absent for a modality the model lacks, was not given, or got as `<modality>_tower_embeds`;
            feature-vector towers have none. `output_hidden_states` may list layer indices (e.g. `[0, -1]`) for the
            towers that can capture a subset; attentions come only with `attn_implementation="eager"` (SDPA computes
            none).
        loss_terms (`dict[str, torch.FloatTensor]`): unweighted regularisers by name (KLs already times `kl_scale`).
        component_names (`tuple[str]`): `("redundancy", "unique_<modality>"..., "synergy")`.
        subset_weights (`torch.FloatTensor` of shape `(batch_size, 2^num_modalities - 1)`, with
            `reliability_subsets=True`): the probability that exactly each subset of the modalities works (see
            [`subset_probabilities`]; subsets as [`modality_subsets`] lists them).
        subset_decomposition ([`DmilModelOutput`], with `reliability_subsets=True`): the decomposition of every sample
            with only each subset's modalities, as if the others were missing: `(2^M - 1) * batch_size` rows,
            subset-major.
        reliability_logits (`torch.FloatTensor` of shape `(batch_size, num_modalities)`), partial_rows
            (`torch.LongTensor` of shape `(num_rows,)`), partial_modalities (`torch.BoolTensor` of shape
            `(num_rows, num_modalities)`) and partial_decomposition ([`DmilModelOutput`]): in training with
            `reliability_partial_target="responsibility"` (see [`DmilConfig`]), the reliability heads' logits (with
            their gradient), the rows with a partly corrupted modality, which of their modalities those are, and
            the rows' decomposition with every present modality trusted, then with the corrupted ones left
            out (`2 * num_rows` rows, no gradient).
    """

    component_embeds: torch.FloatTensor | None = None
    component_mask: torch.BoolTensor | None = None
    modality_embeds: torch.FloatTensor | None = None
    modality_mask: torch.BoolTensor | None = None
    modality_reliability: torch.FloatTensor | None = None
    task_relevant_embeds: torch.FloatTensor | None = None
    task_irrelevant_embeds: torch.FloatTensor | None = None
    synergy_pair_embeds: torch.FloatTensor | None = None
    synergy_pair_mask: torch.BoolTensor | None = None
    synergy_subset_embeds: torch.FloatTensor | None = None
    synergy_subset_mask: torch.BoolTensor | None = None
    text_model_output: ModelOutput | None = None
    vision_model_output: ModelOutput | None = None
    audio_model_output: ModelOutput | None = None
    loss_terms: dict | None = None
    component_names: tuple | None = None
    subset_weights: torch.FloatTensor | None = None
    subset_decomposition: "DmilModelOutput | None" = None
    reliability_logits: torch.FloatTensor | None = None
    partial_rows: torch.LongTensor | None = None
    partial_modalities: torch.BoolTensor | None = None
    partial_decomposition: "DmilModelOutput | None" = None


@dataclass
class DmilClassifierOutput(_DmilOutput):
    """
    Output of [`DmilForMultimodalClassification`] (and of the baselines, which leave the fields they do not compute
    None). As a tuple (`return_dict=False`): the fields that are not None, in this order (`loss` first when given;
    each `<modality>_model_output` as a tuple of its own).

    Args:
        loss (`torch.FloatTensor` of shape `()`, returned with `labels`): the loss of the current training stage
            (every head's task loss: cross-entropy; per-label binary cross-entropy for multi-label; squared error for
            regression).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): gated prediction (stage 1: the mean of
            the unimodal heads).
        interaction_weights (`torch.FloatTensor` of shape `(batch_size, num_modalities + 2)`): the per-sample
            interaction readout over `component_names` (each row sums to one): the pointwise split of the model's own
            prediction into redundancy, uniqueness and synergy (see [`pointwise_interaction_weights`]); needs no label.
            Multi-label: the split of the predicted label set (every label's decision at once). Regression: the gate
            weights. With `reliability_marginalization`, the readouts of the subsets of modalities that may work,
            each weighted by its share of the evidence for the predicted class (see [`subset_evidence`]).
        gate_weights (`torch.FloatTensor` of shape `(batch_size, num_modalities + 2)`): the gate's softmax weights
            that mix `component_logits` into `logits`; each row sums to one. They serve accuracy, not reading.
        component_logits (`torch.FloatTensor` of shape `(batch_size, num_modalities + 2, num_labels)`).
        unimodal_logits (`torch.FloatTensor` of shape `(batch_size, num_modalities, num_labels)`): level 1's heads on
            the task-relevant latents.
        modality_logits (`torch.FloatTensor` of shape `(batch_size, num_modalities, num_labels)`): the readout's
            estimate of p(y | x_m) from each modality's embedding alone.
        component_embeds (`torch.FloatTensor` of shape `(batch_size, num_modalities + 2, latent_size)`).
        modality_embeds (`torch.FloatTensor` of shape `(batch_size, num_modalities, hidden_size)`).
        modality_mask (`torch.BoolTensor` of shape `(batch_size, num_modalities)`).
        modality_reliability (`torch.FloatTensor` of shape `(batch_size, num_modalities)`, DMIL only): the per-sample
            reliability of each modality in [0, 1], computed without labels (see [`DmilReliability`]); a modality near
            0 is handled like a missing one.
        text_model_output / vision_model_output / audio_model_output (`ModelOutput`, *optional*): the towers' own
            outputs, as in [`DmilModelOutput`].
        loss_terms (`dict[str, torch.FloatTensor]`): every loss term by name, unweighted.
        component_names (`tuple[str]`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    interaction_weights: torch.FloatTensor | None = None
    gate_weights: torch.FloatTensor | None = None
    component_logits: torch.FloatTensor | None = None
    unimodal_logits: torch.FloatTensor | None = None
    modality_logits: torch.FloatTensor | None = None
    component_embeds: torch.FloatTensor | None = None
    modality_embeds: torch.FloatTensor | None = None
    modality_mask: torch.BoolTensor | None = None
    modality_reliability: torch.FloatTensor | None = None
    text_model_output: ModelOutput | None = None
    vision_model_output: ModelOutput | None = None
    audio_model_output: ModelOutput | None = None
    loss_terms: dict | None = None
    component_names: tuple | None = None


def gaussian_kl(mean, logvar, prior_mean=None, prior_logvar=None):
    """KL(N(mean, e^logvar) ‖ prior) summed over the last dim; the prior defaults to N(0, I)."""
    if prior_mean is None:
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mean - prior_mean).pow(2)) / prior_logvar.exp() - 1.0).sum(-1)


def masked_mean(values, mask):
    """Mean of per-sample `values` over the samples where `mask` holds (0 when none does)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def drop_modalities(mask, probability: float):
    """Modality dropout for training: each present modality of each sample is dropped with `probability`, but every
    sample keeps at least one. Returns the new `(batch, num_modalities)` mask."""
    if probability <= 0:
        return mask
    kept = mask & (torch.rand(mask.shape, device=mask.device) >= probability)
    return torch.where(kept.any(1, keepdim=True), kept, mask)


def modality_subsets(num_modalities: int, device=None) -> torch.Tensor:
    """`(2^M - 1, M)` bool: every non-empty subset of the modalities, the full set last."""
    codes = torch.arange(1, 2 ** num_modalities, device=device)
    return (codes.unsqueeze(1) >> torch.arange(num_modalities, device=device)) & 1 == 1


def subset_probabilities(modality_reliability, mask, subsets):
    """`(B, V)`: the probability that exactly the modalities of each subset `(V, M)` work, each present modality
    (`mask` `(B, M)`) working independently with its reliability `(B, M)` (absent ones never: no subset holding one
    has any weight); renormalised over the non-empty subsets. A sample whose every present modality is judged broken
    keeps them all (the reliabilities then say nothing about which to drop)."""
    r = (modality_reliability * mask).unsqueeze(1).double()  # (B, 1, M)
    probability = torch.where(subsets.unsqueeze(0), r, 1.0 - r).prod(-1)  # (B, V)
    total = probability.sum(1, keepdim=True)
    present = (subsets.unsqueeze(0) == mask.unsqueeze(1)).all(-1).double()
    return torch.where(total > 1e-12, probability / total.clamp(min=1e-12), present).to(modality_reliability.dtype)


def _predicted_probability(probabilities, predicted):
    """`(V, B, 1)` each subset's probability (`probabilities` `(V, B, C)`) of the predicted class (`predicted`
    `(B,)`)."""
    return probabilities.gather(-1, predicted.view(1, -1, 1).expand(probabilities.shape[0], -1, 1))


def _normalised_over_subsets(weights, fallback):
    """`weights` `(V, B, 1)` normalised over the subsets; `fallback` for the samples whose weights are all zero."""
    total = weights.sum(0, keepdim=True)
    return torch.where(total > 0, weights / total.clamp(min=1e-30), fallback)


def subset_posterior(prior, probabilities, predicted):
    """`(V, B, 1)` probability that each subset of modalities is the one that works, given the class the mixture
    predicts: `prior` `(V, B, 1)` (`subset_probabilities`, subset-first) times each subset's probability of the
    predicted class (`probabilities` `(V, B, C)`, `predicted` `(B,)`), normalised over the subsets."""
    return _normalised_over_subsets(prior * _predicted_probability(probabilities, predicted), prior)


def subset_evidence(prior, probabilities, predicted):
    """`(V, B, 1)` share of each subset of modalities in the evidence for the class the mixture predicts: `prior`
    `(V, B, 1)` (`subset_probabilities`, subset-first) times how far each subset's probability of the predicted class
    (`probabilities` `(V, B, C)`, `predicted` `(B,)`) exceeds chance (`1 / C`), normalised over the subsets. A subset
    that predicts at chance explains nothing, however probable it is: a modality the reliability head doubts but that
    alone explains the prediction (a clean sentence in a style the head never saw) takes the weight; one whose
    absence predicts as well keeps no more than its prior's share. Where no subset beats chance:
    [`subset_posterior`]."""
    likelihood = _predicted_probability(probabilities, predicted)
    posterior = _normalised_over_subsets(prior * likelihood, prior)
    return _normalised_over_subsets(prior * (likelihood - 1.0 / probabilities.shape[-1]).clamp(min=0.0), posterior)


def learns_responsibility(config) -> bool:
    """Whether the reliability heads learn the responsibility target on partly corrupted rows (see
    `DmilConfig.reliability_partial_target`): single-label classification with `"responsibility"`."""
    return (config.reliability_partial_target == "responsibility"
            and problem_type(config) == "single_label_classification")


def component_reliability(modality_reliability):
    """`(B, M + 2)` availability of each component from the modalities' reliabilities `(B, M)` (independent, 0 for
    absent ones): redundancy needs any one reliable modality, `unique_<m>` needs m, synergy at least two."""
    unreliable = 1.0 - modality_reliability
    num = modality_reliability.shape[1]
    # others[:, m]: the product over the modalities other than m (m's own factor replaced by an exact 1).
    itself = torch.eye(num, dtype=torch.bool, device=unreliable.device)
    others = torch.where(itself, 1.0, unreliable.unsqueeze(1)).prod(-1)
    none = unreliable.prod(1, keepdim=True)
    exactly_one = (modality_reliability * others).sum(1, keepdim=True)
    return torch.cat([1.0 - none, modality_reliability, (1.0 - none - exactly_one).clamp(min=0.0)], 1)


def pointwise_interaction_weights(modality_logits, logits, modality_mask, log_prior=None, component_mask=None,
                                  multi_label: bool = False):
    r"""
    The per-sample interaction readout: how the information about the model's own prediction splits into
    redundancy, uniqueness and synergy, as weights over `("redundancy", "unique_<m>"..., "synergy")`.

    With \(\hat y\) the predicted class, the pointwise information of modality m and of all modalities are
    \(i_m = \log p(\hat y \mid x_m) - \log p(\hat y)\) (from the per-modality heads) and
    \(i = \log p(\hat y \mid x) - \log p(\hat y)\) (from the fused prediction). The split is the
    minimum-mutual-information PID applied to that one sample, as `dmil_hf.interactions.pointwise_interactions` does
    with the true label: \(r\) is the second largest \(i_m^+\) (with two modalities, \(\min_m i_m^+\)),
    \(u_m = (i_m^+ - r)^+\), \(s = (i - \max_m i_m^+)^+\), normalised to sum to one (uniform over the existing
    components when all are zero). Redundant samples are those at least two modalities predict alone, unique ones
    those only one modality predicts, synergistic ones those only the fusion predicts. With three or more modalities,
    redundancy is what two of them share rather than the minimum over all: one weak modality (a speaker it has not
    heard) would otherwise turn every redundant sample into a unique one (on `digits` validation the share of samples
    whose largest weight names the true type went from 67.5-77.7% to 75.7-81.8% over two trained models).

    Multi-label (`multi_label=True`): \(\hat y\) is the predicted label set, the vector of every label's own
    decision (logit > 0), and the labels are read as independent Bernoullis, so \(\log p(\hat y \mid x_m) =
    \sum_k \log p(\hat y_k \mid x_m)\) (sigmoids of the logits), and likewise for the fused prediction and the prior:
    the split is of the information about the whole predicted set, the labels predicted absent included.

    Args:
        modality_logits (`torch.FloatTensor` of shape `(batch_size, num_modalities, num_labels)`): p(y | x_m) from
            each modality alone.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): the fused prediction.
        modality_mask (`torch.BoolTensor` of shape `(batch_size, num_modalities)`): absent modalities carry nothing.
        log_prior (`torch.FloatTensor` of shape `(num_labels,)`, *optional*): log p(y); uniform when omitted
            (multi-label: log p(label k present), 1/2 when omitted).
        component_mask (`torch.BoolTensor` of shape `(batch_size, num_modalities + 2)`, *optional*): components that
            exist for each sample; the others get weight 0 (a float tensor in [0, 1] scales them: how available each
            component is, e.g. from the modalities' reliabilities).
        multi_label (`bool`, defaults to `False`): the logits are independent per-label logits (see above).
    """
    fused = logits.float()
    if multi_label:
        # The log-probability of the predicted set: Σ_k log σ(±logit_k), + where label k is predicted present.
        sign = torch.where(fused > 0, 1.0, -1.0)  # (B, C)
        fused_log_p = F.logsigmoid(fused * sign).sum(-1, keepdim=True)  # (B, 1)
        unimodal_log_p = F.logsigmoid(modality_logits.float() * sign.unsqueeze(1)).sum(-1)  # (B, M)
        log_present = fused.new_full((fused.shape[-1],), -math.log(2.0)) if log_prior is None else log_prior.float()
        log_present = log_present.to(fused.device)
        prior = torch.where(sign > 0, log_present, torch.log1p(-log_present.exp())).sum(-1, keepdim=True)  # (B, 1)
    else:
        unimodal = modality_logits.float().log_softmax(-1)
        fused = fused.log_softmax(-1)
        predicted = fused.argmax(-1, keepdim=True)  # (B, 1)
        if log_prior is None:
            log_prior = fused.new_full((fused.shape[-1],), -math.log(fused.shape[-1]))
        prior = log_prior.float().to(fused.device)[predicted]  # (B, 1)
        fused_log_p = fused.gather(-1, predicted)
        unimodal_log_p = unimodal.gather(-1, predicted.unsqueeze(1).expand(-1, unimodal.shape[1], 1)).squeeze(-1)
    information = (unimodal_log_p - prior).clamp(min=0.0) * modality_mask.to(fused.dtype)
    joint = (fused_log_p - prior).clamp(min=0.0)  # (B, 1)
    # Absent modalities carry 0, so with fewer than two present the second largest is 0: no redundancy.
    ranked = information.sort(1, descending=True).values
    redundancy = ranked[:, 1:2] if ranked.shape[1] > 1 else torch.zeros_like(joint)
    unique = (information - redundancy).clamp(min=0.0) * modality_mask.to(fused.dtype)
    synergy = (joint - ranked[:, :1]).clamp(min=0.0)
    values = torch.cat([redundancy, unique, synergy], 1)
    exists = torch.ones_like(values, dtype=torch.bool) if component_mask is None else component_mask
    values = values * exists.to(values.dtype)
    total = values.sum(1, keepdim=True)
    uniform = exists.to(values.dtype) / exists.sum(1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, values / total.clamp(min=1e-12), uniform)


class DmilLabelPrior(nn.Module):
    """Counts of the training labels seen (buffers saved with the model): p(y) for the interaction readout. Multi-label
    (`multi_label=True`): how often each label was present, and in `samples` how many samples were seen, for
    p(label k present)."""

    def __init__(self, num_labels: int, multi_label: bool = False):
        super().__init__()
        self.register_buffer("counts", torch.zeros(num_labels))
        if multi_label:
            self.register_buffer("samples", torch.zeros(()))

    def update(self, labels):
        if hasattr(self, "samples"):  # multi-hot (batch, num_labels)
            labels = labels.detach().to(self.counts)
            self.counts.add_(labels.sum(0))
            self.samples.add_(labels.shape[0])
            return
        # index_add_ keeps a static shape (bincount's output size depends on the values: no torch.compile/export).
        labels = labels.view(-1).to(self.counts.device)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.counts.dtype))

    def log_prior(self):
        # Laplace smoothing: before any training (or for an unseen class) the prior stays close to uniform (1/2 for
        # each label of a multi-label model).
        if hasattr(self, "samples"):
            return ((self.counts + 1.0) / (self.samples + 2.0)).log()
        counts = self.counts + 1.0
        return (counts / counts.sum()).log()


class DmilReliability(nn.Module):
    """
    Per-sample, per-modality reliability: a small head on each tower's pooled output gives the probability that the
    modality works, trained with binary cross-entropy against `1 - modality_corruption` on the corrupted training
    samples of `dmil_hf.data.add_training_corruption`. It reads the outputs detached, except that the corrupted rows'
    loss sends `tower_gradient` times its gradient into the towers (`DmilConfig.reliability_tower_gradient`).
    Until it has seen such samples in training (the `calibrated` buffer, saved with the model) it returns 1 for every
    present modality, so a model trained without corruption behaves as before. Absent modalities get 0.
    """

    def __init__(self, widths: dict[str, int], hidden_size: int):
        super().__init__()
        self.heads = nn.ModuleDict({m: _mlp(width, hidden_size, 1) for m, width in widths.items()})
        self.register_buffer("calibrated", torch.zeros(()))

    def forward(self, pooled: dict, mask, corruption=None, tower_gradient: dict | None = None):
        """`(reliability (B, M) detached, loss terms, logits (B, M))` from the pooled tower outputs (a dict over the
        modalities present), the presence mask, the training corruption levels `(B, M)` (None at inference) and the
        factor on the gradient the corrupted rows send into each modality's tower (a dict; absent: none). The terms
        are the binary cross-entropy against `1 - corruption`; `responsibility_terms` recomputes them with a learned
        target for the partly corrupted rows."""
        names = list(self.heads)
        reference = next(iter(pooled.values()))

        def head_input(i, m):
            factor = (tower_gradient or {}).get(m, 0.0)
            if factor == 0.0 or corruption is None or not pooled[m].requires_grad:  # frozen or cached: nothing to reach
                return pooled[m].detach()
            return scale_gradient(pooled[m], (factor * (corruption[:, i:i + 1] > 0)).to(pooled[m].dtype))

        logits = torch.stack([self.heads[m](head_input(i, m)).squeeze(-1) if m in pooled
                              else reference.new_zeros(reference.shape[0]) for i, m in enumerate(names)], 1).float()
        if corruption is None:  # no target: zeros that keep the heads in the graph (DDP wants every parameter)
            terms = _by_name(_names("reliability_{}", names), logits.sum(0) * 0.0)
        else:
            terms = self._terms(logits, 1.0 - corruption, mask)
        if corruption is not None and self.training:
            self.calibrated.fill_(1.0)
        reliability = torch.where(self.calibrated > 0, logits.detach().sigmoid(), 1.0)
        return reliability * mask.to(reliability.dtype), terms, logits

    def _terms(self, logits, target, mask) -> dict:
        """`reliability_<m>`: the binary cross-entropy of each modality's logits `(B, M)` against `target` `(B, M)`,
        averaged over the rows where it is present."""
        return {f"reliability_{m}": masked_mean(F.binary_cross_entropy_with_logits(logits[:, i], target[:, i],
                                                                                     reduction="none"), mask[:, i])
                for i, m in enumerate(self.heads)}

    @staticmethod
    def responsibility_target(corruption, rows, learned, trusted_log_p, left_out_log_p):
        """The heads' target `(B, M)` with the partly corrupted rows' target learned
        (`reliability_partial_target="responsibility"`): on the rows `rows` (indices), each modality where `learned`
        `(R, M)` holds learns the responsibility of the path that trusts it, `p_trusted / (p_trusted + p_left_out)`
        (the two paths' probabilities of the true label, given as log-probabilities `(R,)`); every other entry keeps
        the target `1 - corruption`."""
        target = 1.0 - corruption
        responsibility = torch.sigmoid(trusted_log_p - left_out_log_p).unsqueeze(1).expand_as(learned)
        return target.index_put((rows,), torch.where(learned, responsibility, target[rows]))


class DmilGroupedLinear(nn.Module):
    """
    `groups` independent linear layers run as one batched matrix product: group g maps `inputs[g]` with its own
    `weight[g]` `(out_features, in_features)` and `bias[g]`, as `nn.Linear` would. DMIL's head holds one layer per
    modality (or per component); stacked, they cost one operator call instead of one per modality.

    Args:
        groups (`int`): number of layers (e.g. modalities).
        in_features / out_features (`int`): sizes of each layer.

    Shapes: `inputs` `(groups, batch, in_features)` -> `(groups, batch, out_features)`.
    """

    def __init__(self, groups: int, in_features: int, out_features: int):
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features))
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's default for every group: Kaiming-uniform with a=sqrt(5) is U(-1/sqrt(in), 1/sqrt(in)), as is
        # its bias.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, inputs):
        return torch.baddbmm(self.bias.unsqueeze(1), inputs, self.weight.transpose(1, 2))

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}"


class DmilGaussianBottleneck(nn.Module):
    """Diagonal-Gaussian bottleneck: reparameterised sample in training, the mean in eval. With `groups`, one
    bottleneck per group (e.g. per modality) on inputs `(groups, batch, input_size)`, run as one batched product."""

    def __init__(self, input_size: int, latent_size: int, groups: int | None = None):
        super().__init__()
        self.proj = (nn.Linear(input_size, 2 * latent_size) if groups is None
                     else DmilGroupedLinear(groups, input_size, 2 * latent_size))

    def forward(self, inputs, sample: bool = True):
        """`(sample, mean, logvar)`; `sample=False` skips the draw (the sample is then the mean)."""
        mean, logvar = self.proj(inputs).chunk(2, dim=-1)
        logvar = logvar.clamp(-10.0, 10.0)
        draw = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training and sample else mean
        return draw, mean, logvar


def _grouped_mlp(groups: int, input_size: int, hidden_size: int, output_size: int) -> nn.Sequential:
    """One `_mlp` per group, run as two batched products: `(groups, batch, input_size)` -> `(groups, batch, output)`."""
    return nn.Sequential(DmilGroupedLinear(groups, input_size, hidden_size), nn.GELU(),
                         DmilGroupedLinear(groups, hidden_size, output_size))


class DmilPairwiseSynergy(nn.Module):
    """
    The synergy component built pair by pair (`synergy_structure="pairs"`): for each pair of modalities `(i, j)` one
    small MLP reads `[v_i, v_j, v_i ⊙ v_j]` (all pairs as one batched product), and a learned per-sample attention
    pools the pairs' latents, each pair's score offset by the log of how far both of its modalities are present and
    reliable. A synergy of two modalities therefore keeps its input when a third one is lost or broken, instead of
    seeing an input it never saw in training. With two modalities there is one pair: the paper's synergy MLP.

    Each pair's latent is also trained to predict the label alone (`DmilForMultimodalClassification` adds its
    synergy-head loss to the component's), so whichever pairs remain carry what they can.

    Shapes: `views` `(batch, modalities, width)`, `trust` `(batch, modalities)` in [0, 1] -> the pooled latent
    `(batch, latent)`, the pairs' latents `(batch, pairs, latent)` and which pairs are present `(batch, pairs)`.
    """

    def __init__(self, num_modalities: int, width: int, hidden_size: int, latent_size: int):
        super().__init__()
        pairs = [(i, j) for i in range(num_modalities) for j in range(i + 1, num_modalities)]
        self.left, self.right = [i for i, _ in pairs], [j for _, j in pairs]
        self.mlp = _grouped_mlp(len(pairs), 3 * width, hidden_size, latent_size)
        # One pair needs no pooling (and a parameter outside the graph would stop DDP).
        self.score = DmilGroupedLinear(len(pairs), latent_size, 1) if len(pairs) > 1 else None

    def forward(self, views, trust):
        left, right = views[:, self.left], views[:, self.right]  # (B, P, width)
        latents = self.mlp(torch.cat([left, right, left * right], -1).transpose(0, 1))  # (P, B, latent)
        pair_trust = (trust[:, self.left] * trust[:, self.right]).to(latents.dtype)  # (B, P)
        present = pair_trust > 0
        if self.score is None:
            return latents[0], latents.transpose(0, 1), present
        # An absent pair is out (a finite floor: a sample with no pair gets a uniform, unused mix, never NaN); an
        # unreliable one is down-weighted by the log of its trust.
        scores = self.score(latents).squeeze(-1).t() + pair_trust.clamp(min=1e-4).log()
        scores = scores.masked_fill(~present, -1e4)
        pooled = torch.einsum("bp,pbl->bl", scores.softmax(-1), latents)
        return pooled, latents.transpose(0, 1), present


def _masked_means(values, mask):
    """`masked_mean` of each row: `values` and `mask` `(groups, batch)` -> `(groups,)`."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _names(template: str, names) -> list[str]:
    """The loss-term names `template.format(name)` of each modality (or component) of `names`."""
    return [template.format(name) for name in names]


def _by_name(names: list, values) -> dict:
    """`{name: value}` for a `(len(names),)` tensor of loss terms: every term cut from one vector (one autograd node,
    not one per term); [`stacked_terms`] reads the vector back whole."""
    return dict(zip(names, values.unbind(0)))


def stacked_terms(terms: dict) -> torch.Tensor:
    """The 0-d loss terms `terms` as one vector, in their order. Terms that `_by_name` cut from one vector and that still
    stand in its order enter as that vector (no stack of the terms, and in the backward pass no unbind of the vector);
    the others are stacked. Under `torch.compile` / `torch.export` every term is stacked (the graph fuses them)."""
    values = [value if value.dim() == 0 else value.reshape(()) for value in terms.values()]
    if torch.compiler.is_compiling():
        return torch.stack(values)
    parts, loose, i = [], [], 0
    while i < len(values):
        base = values[i]._base
        size = base.shape[0] if base is not None and base.dim() == 1 else 0
        if size and all(i + k < len(values) and values[i + k]._base is base
                        and values[i + k].storage_offset() == base.storage_offset() + k * base.stride(0)
                        for k in range(size)):
            if loose:
                parts.append(torch.stack(loose))
                loose = []
            parts.append(base)
            i += size
        else:
            loose.append(values[i])
            i += 1
    if loose:
        parts.append(torch.stack(loose))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _stack_modalities(values: list, mask) -> torch.Tensor:
    """`(B, M, width)` from one `(B, width)` tensor per modality (None where absent), zero where `mask` `(B, M)` is
    False (a float `mask` weighs each modality of each sample)."""
    reference = next(v for v in values if v is not None)
    stacked = torch.stack([v if v is not None else reference.new_zeros(reference.shape) for v in values], 1)
    return stacked * mask.unsqueeze(-1).to(stacked.dtype)


def scale_gradient(tensor, scale):
    """`tensor` in the forward pass, its gradient multiplied by `scale` (a number, or a tensor that broadcasts, e.g.
    one factor per row) in the backward pass; a number 0 detaches it."""
    if isinstance(scale, (int, float)):
        if scale == 1.0:
            return tensor
        if scale == 0.0:
            return tensor.detach()
    return tensor * scale + tensor.detach() * (1.0 - scale)


def _mlp(input_size: int, hidden_size: int, output_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(input_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, output_size))



def _check_safetensors_file(path: str) -> None:
    """Read a safetensors header with the standard library; raise naming `path` if the file is cut short or garbage."""
    size = os.path.getsize(path)

    def broken(why):
        return OSError(f"The weights file {path!r} is {why}; save or download the checkpoint again.")

    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise broken(f"{size} bytes long, shorter than a safetensors header (truncated or empty)")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size - 8:
            raise broken(f"not a complete safetensors file: its header claims {header_size} bytes, the file has {size}")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, ValueError):
            raise broken("not a safetensors file: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise broken("not a safetensors file: its header is not a JSON object")
    end = max((int(entry["data_offsets"][1]) for name, entry in header.items()
               if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry), default=0)
    if 8 + header_size + end > size:
        raise broken(f"truncated: its header describes {8 + header_size + end} bytes, the file has {size}")


def _check_checkpoint_path(path, kwargs) -> None:
    """Clear errors for local checkpoint paths, before transformers' loading code (see `from_pretrained`)."""
    if not isinstance(path, (str, os.PathLike)):
        return
    path = os.fspath(path)
    folder = os.path.join(path, kwargs["subfolder"]) if kwargs.get("subfolder") else path
    if os.path.isfile(path):
        raise OSError(f"{path!r} is a file; from_pretrained expects the folder written by save_pretrained "
                      "(holding config.json and model.safetensors).")
    if os.path.isdir(path):
        if not isinstance(kwargs.get("config"), DmilConfig) and not os.path.isfile(os.path.join(folder, "config.json")):
            listing = sorted(os.listdir(folder))[:8] if os.path.isdir(folder) else []
            raise OSError(
                f"No config.json in {folder!r} (it holds {listing or 'nothing'}); expected a folder written by "
                "save_pretrained, with config.json and model.safetensors."
            )
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".safetensors"):
                    _check_safetensors_file(os.path.join(folder, name))
        return
    # Not on disk. A Hub repo id is "name" or "namespace/name"; anything else was meant as a local folder.
    looks_local = (os.path.isabs(path) or path.startswith((".", "~")) or "\\" in path or path.count("/") > 1
                   or path.endswith("/"))
    if looks_local:
        raise OSError(f"No folder at {path!r}; expected a local folder written by save_pretrained, or a Hub repo id "
                      "such as 'user/model'.")


class DmilFeatureTower(nn.Module):
    """Tower for a precomputed feature vector `(batch, width)` or sequence `(batch, time, width)` (time-averaged)."""

    main_input_name = FEATURES

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size = input_size
        self.norm = nn.LayerNorm(input_size)
        self.mlp = _mlp(input_size, hidden_size, hidden_size)

    def forward(self, features, attention_mask=None):
        if features.dim() == 3:
            if attention_mask is None:
                features = features.mean(1)
            else:
                weights = attention_mask.to(features.dtype).unsqueeze(-1)
                features = (features * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.mlp(self.norm(features))


def build_tower(config, with_pooler: bool = True):
    """A randomly initialised tower from a transformers config (the encoder of an encoder-decoder); without its
    pooling layer when `with_pooler` is False and the model class has one to leave out (e.g. BERT, ViT)."""
    kwargs = {}
    model_class = MODEL_MAPPING[type(config)] if type(config) in MODEL_MAPPING else None
    if not with_pooler and model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    tower = AutoModel.from_config(config, **kwargs)
    return tower.get_encoder() if getattr(config, "is_encoder_decoder", False) else tower


def tower_width(config) -> int:
    sizes = getattr(config, "hidden_sizes", None)
    return int(sizes[-1]) if sizes else int(config.hidden_size)


class DmilEncoders(nn.Module):
    """
    The modality towers and their projections to `hidden_size`, shared by DMIL and the baselines. Takes the
    model's prefixed keyword inputs, checks them, routes them to each tower by its `main_input_name` and pools.

    Instead of a tower's inputs, `<modality>_tower_embeds` `(batch, tower width)` may carry that tower's pooled output
    computed beforehand (what [`DmilEncoders.pooled_output`] returns): the tower is then skipped and only its
    projection runs (so that modality has no `<modality>_model_output` in the outputs). The towers named by `config.freeze_towers` are frozen: always in eval mode, `requires_grad`
    off, and run without building a graph.

    `towers` (modality -> module, optional) are already-built towers to use instead of random ones (as
    `VisionTextDualEncoderModel` takes its encoders): e.g. pretrained models, whose weights stay as they are. Each
    must be a tower modality of `config`, whose `<modality>_config` describes it.
    """

    def __init__(self, config: DmilConfig, towers: dict[str, nn.Module] | None = None):
        super().__init__()
        self.config = config
        self.modalities = config.modalities
        towers = self._check_given_towers(config, towers or {})
        self.towers = nn.ModuleDict()
        widths = {}
        for modality in self.modalities:
            sub_config = config.tower_config(modality)
            if sub_config is None:
                self.towers[modality] = DmilFeatureTower(config.feature_modalities[modality], config.feature_hidden_size)
                widths[modality] = config.feature_hidden_size
            else:
                # Only "auto" pooling reads a tower's pooler; otherwise it would be dead weight (and unused in DDP).
                self.towers[modality] = towers[modality] if modality in towers else build_tower(
                    sub_config, with_pooler=config.tower_pooling == "auto")
                widths[modality] = tower_width(sub_config)
        # transformers gathers these from a model's direct children only: lift them from the nested towers, so
        # device_map="auto" and FSDP's auto-wrap policy know which tower blocks must stay whole. Only classes that
        # occur are kept (a Whisper encoder inherits "WhisperDecoderLayer", which accelerate's FSDP would reject).
        def lifted(attribute):
            return {name for tower in self.towers.values() for name in (getattr(tower, attribute, None) or ())}

        present = {type(module).__name__ for tower in self.towers.values() for module in tower.modules()}
        self._no_split_modules = sorted(lifted("_no_split_modules") & present)
        self._keep_in_fp32_modules = sorted(lifted("_keep_in_fp32_modules"))
        self.projections = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(widths[m], config.hidden_size), nn.LayerNorm(config.hidden_size))
            for m in self.modalities
        })
        self.dropouts = nn.ModuleDict({m: nn.Dropout(p) for m, p in config.dropout_probabilities().items()})
        self.apply_freezing()

    @staticmethod
    def _check_given_towers(config: DmilConfig, towers: dict) -> dict:
        """Refuse towers the config has no tower slot for; prepare the others: the encoder of an encoder-decoder,
        no pooler unless `tower_pooling="auto"` reads it (as `build_tower` does, so that a saved checkpoint holds what
        `from_pretrained` rebuilds and DDP sees no unused parameters), and marked initialised, so the model's
        `post_init` leaves their weights alone."""
        prepared = {}
        for modality, tower in towers.items():
            if config.tower_config(modality) is None:
                raise ValueError(f"a tower was given for {modality!r}, but the config has no {modality}_config (its "
                                 f"tower modalities are {[m for m in config.modalities if config.tower_config(m)]}); "
                                 f"build the config with {modality}_config=tower.config.")
            if not isinstance(tower, nn.Module):
                raise TypeError(f"the {modality} tower must be a torch.nn.Module (e.g. a PreTrainedModel); got "
                                f"{type(tower).__name__}.")
            if getattr(getattr(tower, "config", None), "is_encoder_decoder", False):
                tower = tower.get_encoder()
            if config.tower_pooling != "auto" and getattr(tower, "pooler", None) is not None:
                tower.pooler = None
            for module in tower.modules():
                module._is_hf_initialized = True
            prepared[modality] = tower
        return prepared

    # --- frozen towers -----------------------------------------------------------------------------------------
    @property
    def frozen_modalities(self) -> tuple[str, ...]:
        return self.config.frozen_modalities

    def apply_freezing(self) -> None:
        """Put the frozen towers (`config.freeze_towers`) in eval mode with `requires_grad` off. Runs at
        construction and on every `train()`/`eval()`; call it after replacing a tower in `towers`."""
        for modality in self.frozen_modalities:
            self.towers[modality].eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.apply_freezing()
        return self

    def tower_width(self, modality: str) -> int:
        """Width of the tower's pooled output: the size `<modality>_tower_embeds` must have."""
        return self.projections[modality][0].in_features

    def input_names(self, modality: str) -> tuple[str, ...]:
        """The keyword arguments the tower of `modality` accepts (without the prefix)."""
        if modality in self.config.feature_modalities:
            return (FEATURES, "attention_mask")
        tower = self.towers[modality]
        # A LoRA-wrapped tower (peft) forwards **kwargs: read the signature of the model it wraps.
        tower = tower.get_base_model() if hasattr(tower, "get_base_model") else tower
        params = inspect.signature(tower.forward).parameters
        return tuple(name for name, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))

    def _accepts_output_flags(self, modality: str) -> bool:
        """transformers towers take `output_hidden_states`/`output_attentions` (explicitly or through **kwargs)."""
        if modality in self.config.feature_modalities:
            return False
        tower = self.towers[modality]
        tower = tower.get_base_model() if hasattr(tower, "get_base_model") else tower
        params = inspect.signature(tower.forward).parameters
        return "output_hidden_states" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())

    def expected_keys(self) -> list[str]:
        """Every prefixed input: the towers' own, then each modality's `<modality>_tower_embeds`."""
        return ([f"{m}_{name}" for m in self.modalities for name in self.input_names(m)]
                + [f"{m}_{TOWER_EMBEDS}" for m in self.modalities])

    def route(self, inputs: dict) -> dict[str, dict]:
        """Split prefixed inputs by modality, with clear errors for anything unknown or malformed. Only shapes,
        ranks and dtypes are checked here (no tensor value is read): the value checks are `check_values`."""
        eager = not (torch.compiler.is_compiling() or torch.jit.is_tracing())
        routed: dict[str, dict] = {}
        for key, value in inputs.items():
            if value is None:
                continue
            modality = next((m for m in self.modalities if key.startswith(f"{m}_")), None)
            name = key[len(modality) + 1:] if modality else None
            # The names come from inspecting the towers: checked eagerly (a traced graph was checked when recorded).
            if modality is None or (eager and name != TOWER_EMBEDS and name not in self.input_names(modality)):
                raise ValueError(
                    f"Unknown input {key!r}. This model's modalities are {list(self.modalities)}; expected keyword "
                    f"inputs among {self.expected_keys()} (plus labels, modality_mask)."
                )
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"Input {key!r} must be a torch.Tensor; got {type(value).__name__}.")
            routed.setdefault(modality, {})[name] = value
        if not routed:
            raise ValueError(
                f"No modality was given. Pass inputs for at least one of {list(self.modalities)}, e.g. "
                f"{self.expected_keys()[:3]}. (With transformers.Trainer, the dataset columns must be named like "
                "these; Trainer keeps only the columns that appear in `inspect.signature(model.forward)`.)"
            )
        batch_sizes = {}
        for modality, kwargs in routed.items():
            if TOWER_EMBEDS in kwargs:
                self._check_tower_embeds(modality, kwargs)
                batch_sizes[f"{modality}_{TOWER_EMBEDS}"] = kwargs[TOWER_EMBEDS].shape[0]
                continue
            main = self.main_input_name(modality)
            if main not in kwargs:
                raise ValueError(f"Inputs for modality {modality!r} lack {modality}_{main}; got {sorted(kwargs)}.")
            self._check_main_input(modality, main, kwargs[main])
            for name, tensor in kwargs.items():
                if tensor.dim() == 0:
                    raise ValueError(f"Input {modality}_{name} is a scalar; expected a batch-first tensor.")
                batch_sizes[f"{modality}_{name}"] = tensor.shape[0]
            self._check_companion_shapes(modality, main, kwargs)
        # Compared eagerly only: under torch.export with dynamic shapes the sizes are symbols, which a set cannot hold.
        first = next(iter(batch_sizes.values()))
        if eager and any(size != first for size in batch_sizes.values()):
            raise ValueError(f"Inputs disagree on the batch size: {batch_sizes}.")
        return routed

    def main_input_name(self, modality: str) -> str:
        return self.towers[modality].main_input_name

    def _check_tower_embeds(self, modality, kwargs):
        key, tensor = f"{modality}_{TOWER_EMBEDS}", kwargs[TOWER_EMBEDS]
        others = sorted(f"{modality}_{name}" for name in kwargs if name != TOWER_EMBEDS)
        if others:
            raise ValueError(f"Input {key} replaces the {modality} tower's inputs, but {others} were given too; pass "
                             "either the tower's inputs or its precomputed pooled output, not both.")
        width = self.tower_width(modality)
        if not tensor.is_floating_point():
            raise TypeError(f"Input {key} has dtype {tensor.dtype}; expected a floating-point tensor (the tower's "
                            "pooled output).")
        if tensor.dim() != 2 or tensor.shape[1] != width:
            raise ValueError(f"Input {key} has shape {tuple(tensor.shape)}; expected (batch, {width}), the {modality} "
                             "tower's pooled output (before the projection to hidden_size).")

    def _check_main_input(self, modality, main, tensor):
        key = f"{modality}_{main}"
        if main in _FLOAT_INPUTS and not tensor.is_floating_point():
            hint = (" (raw 0-255 pixels?); expected the image processor's float output (rescaled to [0, 1], then "
                    "normalised): pass images= through DmilProcessor, or convert, e.g. (x.float() / 255 - mean) / std"
                    if main == "pixel_values" else "; expected a floating-point tensor")
            raise TypeError(f"Input {key} has dtype {tensor.dtype}{hint}.")
        if main == "input_ids" and tensor.is_floating_point():
            raise TypeError(f"Input {key} has dtype {tensor.dtype}; expected integer token ids (torch.long).")
        if modality in self.config.feature_modalities:
            width = self.config.feature_modalities[modality]
            if tensor.dim() not in (2, 3) or tensor.shape[-1] != width:
                raise ValueError(
                    f"Input {key} has shape {tuple(tensor.shape)}; expected (batch, {width}) or (batch, time, {width})."
                )
            return
        rank = _MAIN_INPUT_RANK.get(main)
        if rank is not None and tensor.dim() != rank:
            raise ValueError(f"Input {key} has rank {tensor.dim()} (shape {tuple(tensor.shape)}); expected rank {rank}.")
        sub_config = self.config.tower_config(modality)
        channels = getattr(sub_config, "num_channels", None)
        if main == "pixel_values" and channels is not None and tensor.shape[1] != channels:
            raise ValueError(f"Input {key} has {tensor.shape[1]} channels; the vision tower expects {channels}.")
        mel_bins = getattr(sub_config, "num_mel_bins", None)
        if main == "input_features" and mel_bins is not None and tensor.shape[1] != mel_bins:
            raise ValueError(f"Input {key} has {tensor.shape[1]} mel bins; the audio tower expects {mel_bins}.")

    def _check_companion_shapes(self, modality, main, kwargs):
        """Masks and token-type ids must line up with the main input (a mask of another length would be ignored)."""
        tensor = kwargs[main]
        if main == "input_features":  # (batch, mel, frames): the mask is per frame
            expected = {"attention_mask": (tensor.shape[0], tensor.shape[-1])}
        elif main == FEATURES:
            expected = {"attention_mask": tuple(tensor.shape[:2])} if tensor.dim() == 3 else {}
        elif main in ("input_ids", "input_values"):
            expected = {name: tuple(tensor.shape) for name in ("attention_mask", "token_type_ids", "position_ids")}
        else:
            expected = {}
        for name, shape in expected.items():
            if name in kwargs and tuple(kwargs[name].shape) != shape:
                raise ValueError(
                    f"Input {modality}_{name} has shape {tuple(kwargs[name].shape)}; expected {shape}, the shape of "
                    f"{modality}_{main} {tuple(tensor.shape)}" + (" (batch, frames)" if main == "input_features" else "")
                    + "."
                )

    def check_values(self, routed: dict) -> None:
        """
        The data-dependent checks, in one device-to-host transfer: floating inputs finite and of magnitude at most
        `MAX_INPUT_MAGNITUDE`, token ids inside the vocabulary. Run only when [`value_checks_enabled`] says so.
        """
        tensors = [t for kwargs in routed.values() for t in kwargs.values()]
        if not value_checks_enabled(self.config, *tensors):
            return
        checks = []  # (key, kind, reduction)
        for modality, kwargs in routed.items():
            for name, tensor in kwargs.items():
                key = f"{modality}_{name}"
                if tensor.numel() == 0:
                    continue
                if tensor.is_floating_point():
                    checks.append((key, "magnitude", tensor.detach().abs().amax().float()))
                elif name == "input_ids":
                    checks.append((key, "min", tensor.detach().amin().float()))
                    checks.append((key, "max", tensor.detach().amax().float()))
        if not checks:
            return
        values = torch.stack([c[2].cpu() for c in checks]).tolist()
        for (key, kind, _), value in zip(checks, values):
            if kind == "magnitude" and (value != value or value == float("inf")):
                raise ValueError(f"Input {key} holds NaN or infinite values; expected finite values.")
            if kind == "magnitude" and value > MAX_INPUT_MAGNITUDE:
                raise ValueError(
                    f"Input {key} holds values of magnitude up to {value:.3g}; expected normalised inputs of magnitude "
                    f"at most {MAX_INPUT_MAGNITUDE:g} (a tower would overflow to NaN). Normalise them (e.g. with the "
                    "processor), or pass check_input_values=False in the config to skip this check."
                )
            vocab = getattr(self.config.tower_config(key.split("_", 1)[0]), "vocab_size", None)
            if (kind == "min" and value < 0) or (kind == "max" and vocab is not None and value >= vocab):
                raise ValueError(f"Input {key} must hold token ids in [0, {vocab}); got a {kind} of {int(value)}.")

    def pool(self, outputs, attention_mask):
        if isinstance(outputs, torch.Tensor):  # feature towers return the vector itself
            return outputs
        pooled = getattr(outputs, "pooler_output", None)
        if self.config.tower_pooling == "auto" and pooled is not None:
            return pooled.flatten(1)
        hidden = outputs.last_hidden_state
        if hidden.dim() == 4:  # convolutional feature maps (batch, channels, height, width)
            return hidden.mean(dim=(2, 3))
        if self.config.tower_pooling == "cls":
            return hidden[:, 0]
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == hidden.shape[1]:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        # Audio towers subsample time, so a sample-level mask does not line up with the frames: plain mean.
        return hidden.mean(1)

    def pooled_output(self, modality: str, kwargs: dict, output_hidden_states=False, output_attentions=False):
        """
        Run the tower of `modality` on its (unprefixed, already checked) inputs `kwargs` and pool: returns
        `(pooled (batch, tower width), tower outputs)`. A frozen tower runs without a graph. The embedding cache
        stores exactly this `pooled`, so the cached path computes what the raw-input path computes.
        """
        tower = self.towers[modality]
        # Floating inputs in the tower's dtype: float64 arrays (numpy's default) would otherwise fail inside
        # LayerNorm with "mixed dtype", and float32 inputs to a bfloat16 tower likewise.
        dtype = next(tower.parameters()).dtype
        if dtype.is_floating_point:
            kwargs = {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in kwargs.items()}
        flags = {}
        if (output_hidden_states or output_attentions) and self._accepts_output_flags(modality):
            # A list of layer indices passes through: transformers towers capture just those layers.
            flags = {"output_hidden_states": output_hidden_states if isinstance(output_hidden_states, (list, tuple))
                     else bool(output_hidden_states), "output_attentions": bool(output_attentions)}
        with torch.set_grad_enabled(torch.is_grad_enabled() and modality not in self.frozen_modalities):
            outputs = tower(**kwargs, **flags)
            pooled = self.pool(outputs, kwargs.get("attention_mask"))
        return pooled, outputs

    def forward(self, inputs: dict, modality_mask=None):
        """Returns `(embeds (B, M, hidden_size), mask (B, M) bool)`; absent modalities get zero embeddings."""
        embeds, mask, _ = self.encode(inputs, modality_mask)
        return embeds, mask

    def encode(self, inputs: dict, modality_mask=None, output_hidden_states=False, output_attentions=False,
               return_pooled=False):
        """As `forward`, plus the transformers towers' own outputs by modality (with their hidden states and
        attentions; an empty dict when neither is asked for), and with `return_pooled` the pooled tower outputs before
        the projection (a dict over the modalities present)."""
        routed = self.route(inputs)
        self.check_values(routed)
        batch_size = next(iter(next(iter(routed.values())).values())).shape[0]
        device = next(self.parameters()).device
        if modality_mask is not None:
            if not isinstance(modality_mask, torch.Tensor) or tuple(modality_mask.shape) != (batch_size, len(self.modalities)):
                raise ValueError(
                    f"modality_mask must be a tensor of shape ({batch_size}, {len(self.modalities)}) over "
                    f"{list(self.modalities)}; got {getattr(modality_mask, 'shape', type(modality_mask).__name__)}."
                )
            modality_mask = modality_mask.to(device=device, dtype=torch.bool)
        present = torch.tensor([m in routed for m in self.modalities], device=device)
        mask = present.unsqueeze(0).expand(batch_size, -1)
        mask = mask & modality_mask if modality_mask is not None else mask.clone()
        if modality_mask is not None and value_checks_enabled(self.config, mask) and not mask.any(1).all():
            raise ValueError("modality_mask marks every modality absent for some samples; keep at least one.")
        embeds, tower_outputs, pooled_outputs = [], {}, {}
        for modality in self.modalities:
            if modality not in routed:
                embeds.append(None)
                continue
            projection = self.projections[modality]
            if TOWER_EMBEDS in routed[modality]:  # precomputed: the tower is skipped
                pooled = routed[modality][TOWER_EMBEDS].to(projection[0].weight.dtype)
            else:
                pooled, outputs = self.pooled_output(modality, routed[modality], output_hidden_states,
                                                     output_attentions)
                if (output_hidden_states or output_attentions) and self._accepts_output_flags(modality):
                    tower_outputs[modality] = outputs
            embeds.append(self.dropouts[modality](projection(pooled)))
            pooled_outputs[modality] = pooled
        embeds = _stack_modalities(embeds, mask)
        return (embeds, mask, tower_outputs, pooled_outputs) if return_pooled else (embeds, mask, tower_outputs)


class DmilPreTrainedModel(PreTrainedModel):
    config_class = DmilConfig
    base_model_prefix = "dmil"
    # The class-level name is the one argument every DMIL forward declares first; each instance sets its own, the
    # first modality's main input (e.g. "text_input_ids"), which its visible forward signature lists first.
    main_input_name = "modality_mask"
    # forward takes **inputs: without this, Trainer would scale the loss by the number of processes under DDP.
    accepts_loss_kwargs = False
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    def __init__(self, config: DmilConfig, *args, **kwargs):
        if isinstance(config, DmilConfig):
            config.validate_for_model()
        super().__init__(config, *args, **kwargs)

    def post_init(self):
        super().post_init()
        self._bind_forward_signature()

    # --- the forward signature Trainer sees ------------------------------------------------------------------
    def forward_input_names(self) -> tuple[str, ...]:
        """Every keyword `forward` takes: the modality inputs (`text_input_ids`, `<name>_features`, ...) first, then
        the arguments the class declares (`modality_mask`, `labels`, `return_dict`, ...)."""
        encoders = self.base_model.encoders
        declared = [n for n, p in inspect.signature(type(self).forward).parameters.items()
                    if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        return tuple(encoders.expected_keys()) + tuple(declared)

    def _bind_forward_signature(self):
        """
        Give this instance a `forward` whose signature lists its modality inputs. The class's `forward` takes them as
        `**inputs`, which shows `transformers.Trainer` no column name: with `remove_unused_columns=True` (the default)
        it would drop every modality column. Trainer reads `inspect.signature(model.forward)`, so the instance gets a
        thin wrapper that carries a signature built from `config.modalities`. It takes keyword arguments, and as
        transformers models do (`model(input_ids)`), one positional argument: the main input, `main_input_name`.
        """
        names = self.forward_input_names()
        if not names:
            return
        class_forward = type(self).forward

        def forward(self, *args, **kwargs):
            if len(args) > 1 or (args and names[0] in kwargs):
                raise TypeError(
                    f"{type(self).__name__}.forward takes keyword arguments, and at most one positional argument, the "
                    f"main input {names[0]}; got {len(args)} positional argument(s)"
                    + (f" and {names[0]}= as well." if names[0] in kwargs else ".")
                )
            if args:
                kwargs[names[0]] = args[0]
            return class_forward(self, **kwargs)

        functools.update_wrapper(forward, class_forward)
        either, keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter("self", either), inspect.Parameter(names[0], either, default=None)]
            + [inspect.Parameter(name, keyword, default=None) for name in names[1:]])
        object.__setattr__(self, "forward", types.MethodType(forward, self))
        self.main_input_name = names[0]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("forward", None)  # a bound wrapper of a local function: rebuilt by __setstate__
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_modules" in state and state["_modules"]:
            self._bind_forward_signature()

    def _output_options(self, return_dict, output_hidden_states, output_attentions):
        config = self.config
        return (
            return_dict if return_dict is not None else getattr(config, "return_dict", True),
            output_hidden_states if output_hidden_states is not None else bool(getattr(config, "output_hidden_states", False)),
            output_attentions if output_attentions is not None else bool(getattr(config, "output_attentions", False)),
        )

    # --- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        As [`PreTrainedModel.from_pretrained`], with errors that name the path: a folder without `config.json`, a
        local path that does not exist (instead of the Hub's repo-id error), a truncated or garbage
        `*.safetensors` file.
        """
        _check_checkpoint_path(pretrained_model_name_or_path, kwargs)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":  # safetensors' own error type, without the file name
                raise
            raise OSError(
                f"Could not read the weights of {os.fspath(pretrained_model_name_or_path)!r}: {error}. A "
                "*.safetensors file there is truncated or not a safetensors file; save or download it again."
            ) from error

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """
        As [`PreTrainedModel.save_pretrained`], but the weights keep the towers' current (transformers 5) parameter
        names: `save_original_format` defaults to `False` here. With the legacy names (e.g. ViT's
        `attention.attention.query`), `Trainer`'s best-checkpoint reload and `--resume`, which load state dicts
        key by key, would silently skip the renamed tower weights. `from_pretrained` reads both layouts.
        """
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    def _init_weights(self, module):
        # Only DMIL's own layers reach here: transformers dispatches each pretrained tower to its own init.
        # PyTorch's default (Kaiming-uniform) init, not BERT's N(0, 0.02): stacked 0.02-init layers between the loss
        # and the towers starve a tower of signal (on `digits`, a randomly initialised audio tower behind the joint
        # head reached 19% on its samples in 24 epochs with N(0, 0.02), 65% with the default init).
        if isinstance(module, (nn.Linear, DmilGroupedLinear)):
            module.reset_parameters()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, DmilLabelPrior):
            nn.init.zeros_(module.counts)
            if hasattr(module, "samples"):
                nn.init.zeros_(module.samples)
        elif isinstance(module, DmilReliability):
            nn.init.zeros_(module.calibrated)

    @classmethod
    def from_encoders_pretrained(cls, text=None, vision=None, audio=None, feature_modalities=None, **kwargs):
        r"""
        Build a DMIL model around pretrained towers (hub ids or local folders); the head is newly initialised.

        Keyword arguments prefixed `text_`, `vision_` or `audio_` go to that tower's `AutoModel.from_pretrained`;
        the rest go to [`DmilConfig`].

        Example:
        ```python
        >>> model = DmilForMultimodalClassification.from_encoders_pretrained(
        ...     text="path/to/bert", vision="path/to/vit", num_labels=10, vision_attn_implementation="eager")
        ```
        """
        sources = {"text": text, "vision": vision, "audio": audio}
        tower_kwargs = {m: {} for m in TOWER_MODALITIES}
        config_kwargs = {}
        for key, value in kwargs.items():
            prefix, _, rest = key.partition("_")
            if prefix in TOWER_MODALITIES and rest != "config":
                tower_kwargs[prefix][rest] = value
            else:
                config_kwargs[key] = value
        towers = {}
        for modality, source in sources.items():
            if source is None:
                continue
            tower = AutoModel.from_pretrained(source, **tower_kwargs[modality]) if isinstance(source, str) else source
            if not isinstance(tower, PreTrainedModel):
                raise TypeError(f"`{modality}` must be a hub id, a local folder or a PreTrainedModel; got {type(tower).__name__}.")
            towers[modality] = tower.get_encoder() if getattr(tower.config, "is_encoder_decoder", False) else tower
        config = DmilConfig(**{f"{m}_config": t.config for m, t in towers.items()},
                            feature_modalities=feature_modalities, **config_kwargs)
        model = cls(config, towers=towers)
        new = [n for n, _ in model.named_parameters() if ".towers." not in f".{n}" or
               any(f"towers.{m}." in n for m in config.feature_modalities)]
        logger.info(f"Newly initialised DMIL weights (train them): {len(new)} tensors, e.g. {new[:5]}")
        return model


class DmilModel(DmilPreTrainedModel):
    """Towers plus the two-level decomposition; returns the component embeddings of every sample. `towers`: already
    built towers by modality (see [`DmilEncoders`]), e.g. pretrained ones; the others are built from `config`."""

    def __init__(self, config: DmilConfig, towers: dict[str, nn.Module] | None = None):
        super().__init__(config)
        modalities, hidden, latent = config.modalities, config.hidden_size, config.latent_size
        num = len(modalities)
        self.encoders = DmilEncoders(config, towers)
        # The per-modality layers are stacked, one group per modality in `config.modalities` order (see
        # `DmilGroupedLinear`): each runs as one batched product over all modalities. Checkpoints of the layout with
        # one module per modality load through the conversions registered below (`CHECKPOINT_CONVERSIONS`).
        # Level 1: task-relevant / task-irrelevant latents inside each modality.
        self.relevant = DmilGaussianBottleneck(hidden, latent, groups=num)
        self.irrelevant = DmilGaussianBottleneck(hidden, latent, groups=num)
        self.reconstruct = _grouped_mlp(num, 2 * latent, hidden, hidden)
        # Level 2: redundancy (with one alignment bottleneck per modality), uniqueness, synergy.
        self.redundancy = DmilGaussianBottleneck(num * latent, latent)
        self.redundancy_from = DmilGaussianBottleneck(latent, latent, groups=num)
        self.unique = DmilGaussianBottleneck(latent, latent, groups=num)
        self.reconstruct_relevant = _grouped_mlp(num, 2 * latent, latent, latent)
        num_pairs = num * (num - 1) // 2
        width = {"irrelevant": latent, "all": 2 * latent, "embeddings": hidden, "towers": hidden}[config.synergy_source]
        if config.synergy_source == "towers":
            # The synergy component's own view of each tower (its pooled output), so that what it needs from a tower
            # does not have to share one embedding with what the bottlenecks and unimodal heads need.
            self.synergy_projections = nn.ModuleDict({
                m: nn.Sequential(nn.Linear(self.encoders.tower_width(m), hidden), nn.LayerNorm(hidden))
                for m in modalities})
        synergy_hidden = config.synergy_hidden_size or config.hidden_size
        if config.synergy_structure == "pairs":
            self.synergy = DmilPairwiseSynergy(num, width, synergy_hidden, latent)
        else:
            self.synergy = _mlp((num + num_pairs) * width, synergy_hidden, latent)
        if config.reliability_gating:
            self.reliability = DmilReliability({m: self.encoders.tower_width(m) for m in modalities}, hidden)
        self.post_init()

    def synergy_modules(self):
        return [self.synergy] + ([self.synergy_projections] if hasattr(self, "synergy_projections") else [])

    def synergy_inputs(self, pooled: dict, mask, reliability=None):
        """The synergy component's per-modality inputs `(B, M, hidden)` from the pooled tower outputs (`"towers"`):
        stage 1 (the warm-up) reads them detached; stage 3 scales the gradient they send into the towers by
        `synergy_tower_gradient`; its own projections always train. `reliability` `(B, M)`, where given, weighs each
        view and must be zero where `mask` is False (as [`DmilReliability`] returns it)."""
        config = self.config
        scale = {1: 0.0, 2: 1.0, 3: config.synergy_tower_gradient}[config.training_stage]
        views = []
        for i, m in enumerate(config.modalities):
            if m not in pooled:
                views.append(None)
                continue
            views.append(self.encoders.dropouts[m](self.synergy_projections[m](scale_gradient(pooled[m], scale))))
        # An unreliable modality is read as a missing one (whose view is zero), smoothly. The reliabilities are zero
        # where the mask is (one product, not one by the mask and another by the reliabilities).
        return _stack_modalities(views, mask if reliability is None else reliability)

    def level1_modules(self):
        return [self.encoders, self.relevant, self.irrelevant, self.reconstruct]

    def level2_modules(self):
        return [self.redundancy, self.redundancy_from, self.unique, self.reconstruct_relevant]

    def forward(self, modality_mask=None, modality_corruption=None, return_dict=None, output_hidden_states=None,
                output_attentions=None, reliability_subsets: bool = False, **inputs) -> DmilModelOutput | tuple:
        r"""
        Args:
            modality_mask (`torch.BoolTensor` of shape `(batch_size, num_modalities)`, *optional*): per-sample
                presence of each modality (in `config.modalities` order); modalities not passed at all are absent.
            modality_corruption (`torch.FloatTensor` of shape `(batch_size, num_modalities)`, *optional*, training
                only): each modality's corruption level (0 clean, 1 replaced by noise), the column written by
                `dmil_hf.data.add_training_corruption`: the target of the reliability heads; the level-1 and component
                losses skip corrupted modalities.
            return_dict (`bool`, *optional*): return a [`DmilModelOutput`] (default: `config.return_dict`) or a tuple.
            output_hidden_states / output_attentions (`bool`, *optional*): also return each transformers tower's
                output with its hidden states / attention weights, as `<modality>_model_output` (default: the
                config's flags); `output_hidden_states` may be a list of layer indices.
            reliability_subsets (`bool`, defaults to `False`): also decompose every sample with each subset of its
                modalities (`subset_decomposition`) and return how probable each subset is to be the one that works
                (`subset_weights`), from the modalities' reliabilities (needs reliability heads).
            **inputs: modality-prefixed tower inputs, e.g. `text_input_ids`, `text_attention_mask`,
                `vision_pixel_values`, `audio_input_values` / `audio_input_features`, `<name>_features`. An instance's
                `inspect.signature(model.forward)` lists them all (see `forward_input_names`).
        """
        return_dict, output_hidden_states, output_attentions = self._output_options(
            return_dict, output_hidden_states, output_attentions)
        # Stage 2 trains level 2 only: skip building a graph through the frozen towers.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.training_stage != 2):
            embeds, mask, tower_outputs, pooled = self.encoders.encode(
                inputs, modality_mask, output_hidden_states, output_attentions, return_pooled=True)
        corruption = self._check_corruption(modality_corruption, mask)
        if self.training and self.config.training_stage != 1 and self.config.modality_dropout_probability > 0:
            mask = drop_modalities(mask, self.config.modality_dropout_probability)
            embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        if hasattr(self, "reliability"):
            # Transformer towers only: a built-in feature tower shaped to flag noise read partly noised vectors worse.
            config = self.config
            factor = config.reliability_tower_gradient if config.training_stage == 3 else 0.0
            tower_gradient = {m: factor for m in config.modalities if m not in config.feature_modalities}
            reliability, reliability_terms, reliability_logits = self.reliability(pooled, mask, corruption,
                                                                                  tower_gradient)
        else:  # the stage losses read these terms; without reliability heads they are zero
            reliability, reliability_terms = None, {f"reliability_{m}": embeds.new_zeros(()) for m in self.config.modalities}
        synergy_embeds = (self.synergy_inputs(pooled, mask, reliability) if self.config.synergy_source == "towers"
                          else None)
        out = self.decompose(embeds, mask, synergy_embeds, reliability, corruption)
        out.loss_terms.update(reliability_terms)
        if self._learns_partial_target(corruption, reliability):
            rows, learned, decomposition = self.partial_paths(embeds, mask, pooled, corruption)
            if rows.numel():
                out.reliability_logits, out.partial_rows = reliability_logits, rows
                out.partial_modalities, out.partial_decomposition = learned, decomposition
        if reliability_subsets and reliability is not None:
            subsets = modality_subsets(mask.shape[1], mask.device)
            out.subset_weights = subset_probabilities(reliability, mask, subsets)
            out.subset_decomposition = self.decompose_subsets(embeds, mask, pooled, subsets)
        if tower_outputs:  # rebuilt so the fields keep their tuple positions
            out = DmilModelOutput(**dict(out.items()), **{f"{m}_model_output": o for m, o in tower_outputs.items()})
        return out if return_dict else out.to_tuple()

    def _learns_partial_target(self, corruption, reliability) -> bool:
        """Whether this forward pass prepares the reliability heads' responsibility target (see
        `DmilConfig.reliability_partial_target`): in training, stages 2 and 3, single-label, with corrupted rows."""
        return (self.training and corruption is not None and reliability is not None
                and self.config.training_stage != 1 and learns_responsibility(self.config))

    def partial_paths(self, embeds, mask, pooled: dict, corruption):
        """`(rows, learned, decomposition)` for the responsibility target: the rows with a present modality partly
        corrupted (`0 < level < 1`; indices `(R,)`), which of their modalities those are `(R, M)`, and the rows'
        decomposition (no gradient) with every present modality trusted, then with the corrupted ones left out as
        missing (`2 * R` rows, the trusted ones first; None without such rows)."""
        learned = mask & (corruption > 0) & (corruption < 1)
        rows = learned.any(1).nonzero().squeeze(1)
        if not rows.numel():
            return rows, learned[rows], None
        present = mask[rows]
        with torch.no_grad():
            decomposition = self._decompose_kept(embeds, pooled, rows.repeat(2),
                                                 torch.cat([present, present & ~(corruption[rows] > 0)]))
        return rows, learned[rows], decomposition

    def decompose_subsets(self, embeds, mask, pooled: dict, subsets):
        """The decomposition of every sample with only the modalities of each subset `(V, M)` (the others as if
        missing, every kept one fully trusted): `V * B` rows, subset-major. `embeds` `(B, M, hidden)` and `pooled`
        (the towers' pooled outputs by modality) as [`DmilEncoders.encode`] returns them."""
        kept = (mask.unsqueeze(0) & subsets.unsqueeze(1)).flatten(0, 1)  # (V * B, M)
        return self._decompose_kept(embeds, pooled, torch.arange(mask.shape[0], device=mask.device).repeat(
            subsets.shape[0]), kept)

    def _decompose_kept(self, embeds, pooled: dict, index, kept):
        """The decomposition of the samples `index` `(N,)` (row indices of `embeds` and `pooled`, repeats allowed)
        with only the modalities `kept` `(N, M)`, the others as if missing, every kept one fully trusted."""
        trust = kept.to(embeds.dtype)
        synergy_embeds = None
        if self.config.synergy_source == "towers":
            synergy_embeds = self.synergy_inputs({m: p[index] for m, p in pooled.items()}, kept, trust)
        return self.decompose(embeds[index] * trust.unsqueeze(-1), kept, synergy_embeds, trust)

    def _check_corruption(self, corruption, mask):
        if corruption is None:
            return None
        if not isinstance(corruption, torch.Tensor) or tuple(corruption.shape) != tuple(mask.shape):
            raise ValueError(f"{CORRUPTION_INPUT} must be a tensor of shape {tuple(mask.shape)} (batch, one level per "
                             f"modality of {list(self.config.modalities)}); got "
                             f"{getattr(corruption, 'shape', type(corruption).__name__)}.")
        return corruption.to(device=mask.device, dtype=torch.float32)

    def decompose(self, embeds, mask, synergy_embeds=None, reliability=None, corruption=None) -> DmilModelOutput:
        """The decomposition head alone, from projected tower embeddings `(B, M, hidden)` and presence `(B, M)`; with
        `synergy_source="towers"`, also the synergy component's inputs `(B, M, hidden)` (see `synergy_inputs`);
        optionally the modalities' reliabilities `(B, M)` (see [`DmilReliability`]) and the training corruption
        levels `(B, M)` (level-1 losses are computed on uncorrupted modalities only)."""
        if self.config.synergy_source == "towers" and synergy_embeds is None:
            raise ValueError("synergy_source='towers' reads the synergy component's own view of the towers: pass "
                             "`synergy_embeds=model.synergy_inputs(pooled, mask)` (pooled from "
                             "`encoders.encode(..., return_pooled=True)`).")
        config = self.config
        modalities = config.modalities
        # Stage 3 scales the gradient that level 1 (and every component built on it) sends into the towers by
        # `stage3_level1_tower_gradient` (same forward values): at 1 the unimodal objectives keep pulling the towers
        # (robust to a degraded modality, but slow to learn synergy); at 0 the towers learn from the fusion only.
        scale = config.stage3_level1_tower_gradient if config.training_stage == 3 else 1.0
        level1_inputs = embeds if scale == 1.0 else embeds * scale + embeds.detach() * (1.0 - scale)
        clean = mask if corruption is None else mask & (corruption <= 0)
        # The per-modality layers run on group-first tensors `(M, B, width)`: one batched product for all modalities.
        inputs = level1_inputs.transpose(0, 1)
        present, clean = mask.t(), clean.t()
        with torch.set_grad_enabled(torch.is_grad_enabled() and config.training_stage != 2):
            z_tr, mu_tr, lv_tr = self.relevant(inputs)
            z_ir, mu_ir, lv_ir = self.irrelevant(inputs)
            rebuilt = self.reconstruct(torch.cat([z_tr, z_ir], -1))
            kl_level1 = gaussian_kl(mu_tr, lv_tr) + gaussian_kl(mu_ir, lv_ir)
            # The target is detached: the latents must explain the embedding, but the tower must not be pulled
            # toward embeddings that are easy to rebuild (a constant one is the easiest).
            reconstruction = (rebuilt - inputs.detach()).pow(2).mean(-1)
        relevant_means = mu_tr.transpose(0, 1)  # (B, M, latent)
        all_present = mask.all(1)

        # Redundancy: q(R | all modalities), aligned with v(R | m) for every m.
        r_sample, r_mean, r_logvar = self.redundancy(relevant_means.flatten(1))
        kl_redundancy = gaussian_kl(r_mean, r_logvar)
        _, v_mean, v_logvar = self.redundancy_from(mu_tr, sample=False)  # (M, B, latent); only the Gaussians are used
        kl_alignment = gaussian_kl(r_mean, r_logvar, v_mean, v_logvar)
        # Missing modalities: R from the product of the present modalities' alignment Gaussians. Computed for every
        # batch (a few element-wise ops) rather than behind `if not all_present.all()`, which would read a tensor
        # value (a host sync per step, and a data-dependent branch that torch.compile / torch.export cannot trace).
        weights = (mask if reliability is None else reliability).t().unsqueeze(-1).to(r_mean.dtype)
        precision = (-v_logvar).exp() * weights
        total_precision = precision.sum(0).clamp(min=1e-6)
        poe_mean = (v_mean * precision).sum(0) / total_precision
        poe_sample = poe_mean
        if self.training:
            poe_sample = poe_mean + torch.randn_like(poe_mean) * total_precision.rsqrt()
        if reliability is None:
            redundant = torch.where(all_present.unsqueeze(-1), r_sample, poe_sample)
        else:
            # q(R | all) only as far as every modality is reliable; otherwise the reliable modalities' product.
            trusted = (reliability.prod(1, keepdim=True) * all_present.unsqueeze(-1)).to(r_sample.dtype)
            redundant = trusted * r_sample + (1.0 - trusted) * poe_sample

        u_sample, u_mean, u_logvar = self.unique(mu_tr)
        rebuilt_relevant = self.reconstruct_relevant(torch.cat([redundant.expand_as(u_sample), u_sample], -1))
        kl_unique = gaussian_kl(u_mean, u_logvar)
        reconstruction_relevant = (rebuilt_relevant - mu_tr).pow(2).mean(-1)
        # Every term at once, each row `(B,)` averaged over the samples it is computed on: the per-modality ones `(M, B)`
        # and the redundancy's KL.
        kls = config.kl_scale * torch.cat([kl_level1, kl_alignment, kl_unique, kl_redundancy.unsqueeze(0)])
        names = (_names("kl_level1_{}", modalities) + _names("kl_alignment_{}", modalities)
                 + _names("kl_unique_{}", modalities) + ["kl_redundancy"] + _names("reconstruction_{}", modalities)
                 + _names("reconstruction_relevant_{}", modalities))
        rows = torch.cat([kls, reconstruction, reconstruction_relevant])
        used = torch.cat([clean, all_present.expand_as(present), present, all_present.unsqueeze(0), clean, present])
        terms = _by_name(names, _masked_means(rows, used))
        irrelevant_means = mu_ir.transpose(0, 1)

        # Synergy: deterministic, from one vector per modality and their pairwise element-wise products. The paper
        # uses the task-irrelevant latents only ("irrelevant"); "all" adds the task-relevant ones, because a value
        # that is unimodally informative on some samples can be synergistic on others; the default, "embeddings",
        # reads the projected tower embeddings, before the bottlenecks drop what no modality predicts alone.
        # Latents enter as their means: the sampling noise of a weakly used latent would drown the products.
        sources = irrelevant_means
        if config.synergy_source == "all":
            sources = torch.cat([irrelevant_means, relevant_means], -1)
        elif config.synergy_source == "embeddings":
            sources = embeds
        elif config.synergy_source == "towers":
            sources = synergy_embeds
        if reliability is not None and config.synergy_source != "towers":  # "towers" views are weighted already
            sources = sources * reliability.unsqueeze(-1).to(sources.dtype)
        if config.training_stage == 1 and config.synergy_source != "towers":
            sources = sources.detach()  # the stage-1 warm-up trains the synergy head, not the towers (see the config)
        subset_embeds = subset_mask = None
        if config.synergy_structure == "pairs":
            synergistic, pair_embeds, pair_mask = self.synergy(
                sources, mask.to(sources.dtype) if reliability is None else reliability)
        else:
            pair_embeds = pair_mask = None
            synergistic = self._joint_synergy(sources)
            if self.training and config.synergy_subset_weight > 0 and len(modalities) >= 3:
                subset_embeds, subset_mask = self._leave_one_out_synergy(sources, mask)

        component_embeds = torch.cat([redundant.unsqueeze(1), u_sample.transpose(0, 1), synergistic.unsqueeze(1)], 1)
        # Synergy needs two modalities, not all of them: with three, a sample missing one can still be a pair's synergy.
        pairs_present = mask.sum(1) >= 2
        component_mask = torch.cat([torch.ones_like(all_present).unsqueeze(1), mask, pairs_present.unsqueeze(1)], 1)
        component_embeds = component_embeds * component_mask.unsqueeze(-1).to(component_embeds.dtype)
        return DmilModelOutput(
            loss_terms=terms,
            component_embeds=component_embeds,
            component_mask=component_mask,
            modality_embeds=embeds,
            modality_mask=mask,
            task_relevant_embeds=z_tr.transpose(0, 1),
            task_irrelevant_embeds=z_ir.transpose(0, 1),
            component_names=config.component_names,
            modality_reliability=reliability,
            synergy_pair_embeds=pair_embeds,
            synergy_pair_mask=pair_mask,
            synergy_subset_embeds=subset_embeds,
            synergy_subset_mask=subset_mask,
        )

    def _joint_synergy(self, sources):
        """The joint synergy MLP on `(N, M, width)` per-modality vectors and their pairwise products."""
        num = sources.shape[1]
        products = [sources[:, i] * sources[:, j] for i in range(num) for j in range(i + 1, num)]
        return self.synergy(torch.cat([sources.flatten(1)] + products, -1))

    def _leave_one_out_synergy(self, sources, mask):
        """`(latents (B, M, latent), valid (B, M))`: the joint synergy MLP with each modality in turn zeroed (as a
        missing one is), in one batched pass; `valid`: the subsets that keep two present modalities."""
        num = sources.shape[1]
        keep = ~torch.eye(num, dtype=torch.bool, device=sources.device)  # (subsets, modalities)
        dropped = sources.unsqueeze(0) * keep[:, None, :, None].to(sources.dtype)  # (subsets, B, M, width)
        latents = self._joint_synergy(dropped.flatten(0, 1)).view(num, sources.shape[0], -1).transpose(0, 1)
        valid = (mask.unsqueeze(1) & keep.unsqueeze(0)).sum(-1) >= 2
        return latents, valid


# --- the stage losses, written once ---------------------------------------------------------------------------
# Each stage's loss is an expression over the named loss terms of `DmilForMultimodalClassification.classify`:
# `loss_coefficients` reads it as what it is, a weighted sum of the terms, which `evaluate_loss` computes in one
# product (one operator call, where summing term by term took some forty, and as many autograd nodes), and
# `describe_loss` writes it out for the model card. Nodes: a term name; `_PerModality` (Σ over modalities of one or
# more per-modality terms, each with an optional per-modality weight field); `_PerComponent` (Σ over the components);
# `_Sum`; `_Scaled` (the product of config fields, times an expression).


@dataclass(frozen=True)
class _PerModality:
    parts: tuple  # ((term template with {}, weight field or None), ...)


@dataclass(frozen=True)
class _PerComponent:
    template: str


@dataclass(frozen=True)
class _Sum:
    parts: tuple


@dataclass(frozen=True)
class _Scaled:
    fields: tuple  # config fields multiplied left to right
    part: object


# How the card writes each term (`{}`: a modality or component name).
_TERM_LABELS = {"task_gated": "CE(gated)", "gate_synergy": "gate weight(synergy)",
                "task_component_synergy": "CE(synergy head)", "kl_redundancy": "KL(redundancy)",
                "readout_{}": "CE(readout head)", "task_unimodal_{}": "CE(unimodal head)",
                "kl_level1_{}": "KL(level 1)", "reconstruction_{}": "reconstruction",
                "kl_alignment_{}": "KL(alignment)", "kl_unique_{}": "KL(unique)",
                "reconstruction_relevant_{}": "rebuild(task-relevant)", "task_component_{}": "CE(component head)",
                "reliability_{}": "BCE(reliability head)"}
_READOUT = _PerModality((("readout_{}", None),))
_UNIMODAL = _PerModality((("task_unimodal_{}", None),))
_PARSIMONY = _Scaled(("synergy_gate_penalty",), "gate_synergy")
_LEVEL2_KL = _Sum(("kl_redundancy", _PerModality((("kl_alignment_{}", None), ("kl_unique_{}", None)))))
_REBUILD_RELEVANT = _PerModality((("reconstruction_relevant_{}", None),))
_COMPONENTS = _PerComponent("task_component_{}")
# Last in every stage: with no corrupted samples its terms are exact zeros.
_RELIABILITY = _Scaled(("reliability_loss_weight",), _PerModality((("reliability_{}", None),)))
STAGE_LOSSES = {
    1: _Sum((_READOUT, _UNIMODAL,
             _Scaled(("lamb",), _PerModality((("kl_level1_{}", "level1_kl_weights"),
                                              ("reconstruction_{}", "level1_reconstruction_weights")))),
             _Scaled(("stage1_synergy_weight",), "task_component_synergy"), _RELIABILITY)),
    2: _Sum((_READOUT, _PARSIMONY, "task_gated",
             _Scaled(("lamb",), _Sum((_LEVEL2_KL, _Scaled(("stage2_reconstruction_weight",), _REBUILD_RELEVANT)))),
             _Scaled(("stage2_component_weight",), _COMPONENTS), _RELIABILITY)),
    3: _Sum((_READOUT, _PARSIMONY, "task_gated", _Scaled(("stage3_unimodal_weight",), _UNIMODAL),
             _Scaled(("lamb",), _PerModality((("kl_level1_{}", "level1_kl_weights"),))),
             _Scaled(("stage3_reconstruction_weight",), _Sum((_PerModality((("reconstruction_{}", None),)),
                                                              _REBUILD_RELEVANT))),
             _Scaled(("lamb", "stage3_level2_scale"), _LEVEL2_KL),
             _Scaled(("stage3_component_weight",), _COMPONENTS), _RELIABILITY)),
}


def _coefficient(config, fields) -> float:
    value = getattr(config, fields[0])
    for field in fields[1:]:
        value = value * getattr(config, field)
    return value


def loss_coefficients(expression, config) -> dict[str, float]:
    """A stage-loss expression (see `STAGE_LOSSES`) as the weighted sum it is: each term's coefficient by name, in
    the order the expression names them. A term weighted 0 keeps its entry (and its parameters a place in the graph,
    which DDP wants)."""
    coefficients: dict[str, float] = {}

    def add(node, scale):
        if isinstance(node, str):
            coefficients[node] = coefficients.get(node, 0.0) + scale
        elif isinstance(node, _PerModality):
            weights = {field: config.modality_weights(field) for _, field in node.parts if field is not None}
            for m in config.modalities:
                for template, field in node.parts:
                    add(template.format(m), scale if field is None else scale * weights[field][m])
        elif isinstance(node, _PerComponent):
            for name in config.component_names:
                add(node.template.format(name), scale)
        elif isinstance(node, _Sum):
            for part in node.parts:
                add(part, scale)
        else:
            add(node.part, scale * _coefficient(config, node.fields))

    add(expression, 1.0)
    return coefficients


def _loss_weights(names: tuple, coefficients: tuple, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(index, weights)`: where each term of a stage loss lies among the stacked `names`, and its coefficient."""
    position = {name: i for i, name in enumerate(names)}
    return (torch.tensor([position[name] for name, _ in coefficients], device=device),
            torch.tensor([value for _, value in coefficients], dtype=dtype, device=device))


# Made once per setting and device, not copied to the device at every step (a compiled graph holds them as constants).
_cached_loss_weights = functools.lru_cache(maxsize=32)(_loss_weights)


def evaluate_loss(expression, terms: dict, config):
    """The value of a stage-loss expression (see `STAGE_LOSSES`) for the loss terms `terms` (0-d tensors by name):
    the terms stacked and multiplied by their `loss_coefficients` in one product. Terms the expression does not name
    stay out of it (a NaN among them does not reach the loss)."""
    coefficients = loss_coefficients(expression, config)
    missing = coefficients.keys() - terms.keys()
    if missing:
        raise KeyError(f"the stage loss needs the loss terms {sorted(missing)}; got {sorted(terms)}.")
    names, values = tuple(terms), stacked_terms(terms)
    loss_weights = _loss_weights if torch.compiler.is_compiling() else _cached_loss_weights
    index, weights = loss_weights(names, tuple(coefficients.items()), values.dtype, values.device)
    return values.index_select(0, index) @ weights


def describe_loss(expression, config) -> str:
    """A stage-loss expression written out with `config`'s weights (terms weighted 0 are left out; `w_m`: a
    per-modality weight, `Σ_m` / `Σ_k`: over the modalities / components)."""
    def text(node, top=False):
        if isinstance(node, str):
            return _TERM_LABELS.get(node, node)
        if isinstance(node, _PerModality):
            parts = [("w_m·" if field else "") + _TERM_LABELS[template] for template, field in node.parts]
            return f"Σ_m {parts[0]}" if len(parts) == 1 else f"Σ_m ({' + '.join(parts)})"
        if isinstance(node, _PerComponent):
            return f"Σ_k {_TERM_LABELS[node.template]}"
        if isinstance(node, _Sum):
            parts = [t for t in (text(p) for p in node.parts) if t]
            return " + ".join(parts) if top or len(parts) == 1 else f"({' + '.join(parts)})"
        coefficient = _coefficient(config, node.fields)
        return f"{coefficient:g}·{text(node.part)}" if coefficient else ""

    return text(expression, top=True)


# The most training rows the reliability refit reads (`refit_reliability`; `dmil_hf.training.refit_split` draws no more).
REFIT_MAX_ROWS = 16384


class DmilForMultimodalClassification(DmilPreTrainedModel):
    r"""
    DMIL with component heads, unimodal heads and the per-sample gate. The loss depends on
    `config.training_stage` (the stage losses are `STAGE_LOSSES`); `set_training_stage` also freezes what that stage
    keeps fixed (`stage_parameter_groups`). `towers`: already built towers by modality (see [`DmilEncoders`]), e.g.
    pretrained ones; the others are built from `config`.

    Example:
    ```python
    >>> from transformers import BertConfig, ViTConfig
    >>> config = DmilConfig(text_config=BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...     intermediate_size=37), vision_config=ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...     intermediate_size=37, image_size=16, patch_size=8), num_labels=3)
    >>> model = DmilForMultimodalClassification(config)
    >>> out = model(text_input_ids=torch.ones(2, 5, dtype=torch.long), vision_pixel_values=torch.rand(2, 3, 16, 16))
    >>> out.interaction_weights.sum(-1)
    tensor([1., 1.], grad_fn=<SumBackward1>)
    ```
    """

    def __init__(self, config: DmilConfig, towers: dict[str, nn.Module] | None = None):
        super().__init__(config)
        self.num_labels = config.num_labels
        latent, modalities = config.latent_size, config.modalities
        self.dmil = DmilModel(config, towers)
        num, num_components = len(modalities), len(config.component_names)
        # One head per modality / component, stacked as in `DmilModel`. The synergy head stands apart from the
        # others: it trains in stage 1's warm-up, when the redundancy and uniqueness heads are frozen.
        self.unimodal_heads = DmilGroupedLinear(num, latent, config.num_labels)
        self.component_heads = DmilGroupedLinear(num + 1, latent, config.num_labels)  # redundancy, unique_<m>...
        self.synergy_head = nn.Linear(latent, config.num_labels)
        self.gate = _mlp(num_components * latent, config.gate_hidden_size, num_components)
        # The readout's instruments: p(y | x_m) from each modality's embedding alone, with the capacity of the synergy
        # path (an MLP, not a linear head on a bottleneck), so that the fusion does not look synergistic merely by
        # being the stronger classifier. They read detached embeddings: they learn from the towers, never shape them.
        self.modality_heads = _grouped_mlp(num, config.hidden_size, config.hidden_size, config.num_labels)
        self.label_prior = DmilLabelPrior(config.num_labels,
                                          multi_label=problem_type(config) == "multi_label_classification")
        self.post_init()

    # --- the staged schedule -------------------------------------------------------------------------------
    # What each parameter group of `stage_modules` holds, in words (the model card's "trains" column).
    stage_group_descriptions = {
        "level1": "towers and projections, level 1 (task-relevant / -irrelevant latents), unimodal heads",
        "level2": "level 2 (redundancy, uniqueness), their component heads, the gate",
        "synergy": "the synergy component and its head (in stage 1 a warm-up on detached inputs)",
        "readout": "the readout's modality heads (on detached embeddings) and the reliability heads",
    }

    def stage_modules(self) -> dict[str, list[nn.Module]]:
        """Parameter groups of the schedule (see `stage_parameter_groups` for which stage trains which)."""
        return {"level1": self.dmil.level1_modules() + [self.unimodal_heads],
                "level2": self.dmil.level2_modules() + [self.component_heads, self.gate],
                "synergy": self.dmil.synergy_modules() + [self.synergy_head],
                "readout": [self.modality_heads] + ([self.dmil.reliability] if hasattr(self.dmil, "reliability")
                                                    else [])}

    def refit_reliability(self, batches, steps: int, learning_rate: float = 1e-3, modalities=None,
                          max_rows: int = REFIT_MAX_ROWS, seed: int = 0) -> list[float]:
        """
        Train reliability heads alone, on the final model (`DmilConfig.reliability_refit_steps`; run by
        `dmil_hf.training.train_staged` after the last stage): everything else stays as trained. One pass over
        `batches` (model in eval mode, no gradient) keeps each row's pooled tower outputs and the heads' usual target
        (1 - the corruption level; with `reliability_partial_target="responsibility"` the partly corrupted rows learn
        the responsibility of the path that trusts the modality, from this model's two paths), up to `max_rows` rows;
        the steps then draw shuffled batches of those rows (a generator seeded with `seed`), so a step costs the
        heads alone (`dmil_hf.training.train_staged` hands it the refit's own, more corrupted copy of the training
        split: `DmilConfig.reliability_refit_corruption`). Returns each step's loss (the heads' binary
        cross-entropies, summed over `modalities`).

        Args:
            batches: an iterable of training batches (dicts of model inputs with `labels` and `modality_corruption`,
                e.g. a `DataLoader`), read once.
            steps: optimizer steps (AdamW at `learning_rate`), each on as many rows as the first batch had.
            modalities: the heads to refit (default: `DmilConfig.refit_modalities`).
        """
        if not hasattr(self.dmil, "reliability"):
            raise ValueError("refit_reliability needs reliability heads (`reliability_gating=True`).")
        names = list(self.config.modalities)
        modalities = self.config.refit_modalities() if modalities is None else list(modalities)
        unknown = [m for m in modalities if m not in names]
        if unknown:
            raise ValueError(f"refit_reliability: unknown modalities {unknown}; this model has {names}.")
        if not modalities:
            raise ValueError("refit_reliability: no heads to refit (the model has no feature modality or frozen "
                             "tower to refit and `reliability_refit_modalities` names none); pass `modalities`, e.g. "
                             f"{names[:1]}.")
        pooled, masks, targets, batch_size = self._reliability_refit_rows(batches, modalities, max_rows)
        heads = {names.index(m): self.dmil.reliability.heads[m] for m in modalities}
        parameters = [p for head in heads.values() for p in head.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
        flags = [p.requires_grad for p in parameters]
        for p in parameters:
            p.requires_grad_(True)
        generator = torch.Generator().manual_seed(seed)
        order, position, losses = torch.randperm(masks.shape[0], generator=generator), 0, []
        try:
            for _ in range(steps):
                if position >= order.shape[0]:
                    order, position = torch.randperm(masks.shape[0], generator=generator), 0
                rows = order[position:position + batch_size].to(masks.device)
                position += batch_size
                loss = sum(masked_mean(F.binary_cross_entropy_with_logits(
                    head(pooled[i][rows]).squeeze(-1).float(), targets[rows, i], reduction="none"), masks[rows, i])
                    for i, head in heads.items())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        finally:
            for p, flag in zip(parameters, flags):
                p.requires_grad_(flag)
        return losses

    def _reliability_refit_rows(self, batches, modalities, max_rows: int):
        """`(pooled, mask, target, batch size)` for `refit_reliability`: the pooled tower outputs of `modalities` for
        up to `max_rows` rows of `batches` (a dict by the modality's index, zeros where it is absent), the presence
        `(N, M)` and the heads' targets `(N, M)`, read in eval mode without gradient."""
        model, names, was_training = self.dmil, list(self.config.modalities), self.training
        pooled, masks, targets, kept, batch_size = {names.index(m): [] for m in modalities}, [], [], 0, None
        self.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    if kept >= max_rows:
                        break
                    batch = dict(batch)
                    labels, corruption = batch.pop("labels"), batch.pop(CORRUPTION_INPUT, None)
                    if corruption is None:
                        raise ValueError(f"refit_reliability needs the {CORRUPTION_INPUT!r} column of a corrupted "
                                         "training split (`dmil_hf.data.add_training_corruption`).")
                    embeds, mask, _, outputs = model.encoders.encode(batch, batch.pop("modality_mask", None),
                                                                     return_pooled=True)
                    corruption = model._check_corruption(corruption, mask)
                    target = 1.0 - corruption
                    if learns_responsibility(self.config):
                        rows, learned, decomposition = model.partial_paths(embeds, mask, outputs, corruption)
                        if rows.numel():
                            target = self._responsibility_target(corruption, rows, learned, decomposition,
                                                                 labels.to(mask.device))
                    for i, chunks in pooled.items():
                        m = names[i]
                        chunks.append(outputs[m].float() if m in outputs else mask.new_zeros(
                            mask.shape[0], model.encoders.tower_width(m), dtype=torch.float32))
                    masks.append(mask)
                    targets.append(target)
                    kept += mask.shape[0]
                    batch_size = batch_size or mask.shape[0]
        finally:
            self.train(was_training)
        if not masks:
            raise ValueError("refit_reliability got no batches.")
        return ({i: torch.cat(chunks) for i, chunks in pooled.items()}, torch.cat(masks), torch.cat(targets),
                batch_size)

    def learning_rate_scales(self) -> list[tuple[list[nn.Parameter], float]]:
        """Parameters whose learning rate is a multiple of the stage's, with that factor (what
        `dmil_hf.training.DmilTrainer` gives groups of their own): the reliability heads, by
        `config.reliability_learning_rate_scale`."""
        config = self.config
        scale = config.reliability_learning_rate_scale
        if scale == 1.0 or not hasattr(self.dmil, "reliability"):
            return []
        # Heads over towers that the reliability loss itself trains (reliability_tower_gradient) keep the stage's rate.
        shaped = set() if config.reliability_tower_gradient == 0 else {
            m for m in config.modalities if m not in config.feature_modalities and m not in config.frozen_modalities}
        return [([p for m, head in self.dmil.reliability.heads.items() if m not in shaped for p in head.parameters()],
                 scale)]

    @staticmethod
    def stage_parameter_groups(config: DmilConfig, stage: int) -> tuple[str, ...]:
        """The groups of `stage_modules` that `stage` trains: stage 1 `level1` (and `synergy`, warming up on
        detached inputs, when `stage1_synergy_weight` > 0), stage 2 `level2` and `synergy`, stage 3 all; the
        readout's modality heads (`readout`) train in every stage."""
        return {1: ("level1", "readout") + (("synergy",) if config.stage1_synergy_weight else ()),
                2: ("level2", "synergy", "readout"), 3: ("level1", "level2", "synergy", "readout")}[stage]

    def set_training_stage(self, stage: int):
        """Switch the loss to `stage` and set `requires_grad` so only that stage's parameters train. Parameters that
        were frozen before the first call (e.g. base weights under LoRA) and the towers of `config.freeze_towers`
        stay frozen."""
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3; got {stage!r}.")
        if not hasattr(self, "_frozen_before_staging"):
            self._frozen_before_staging = {id(p) for p in self.parameters() if not p.requires_grad}
        encoders = self.dmil.encoders
        frozen = self._frozen_before_staging | {id(p) for m in encoders.frozen_modalities
                                                for p in encoders.towers[m].parameters()}
        trainable = self.stage_parameter_groups(self.config, stage)
        for group, modules in self.stage_modules().items():
            for module in modules:
                for p in module.parameters():
                    p.requires_grad_(group in trainable and id(p) not in frozen)
        self.config.training_stage = stage
        self.train(self.training)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.config.training_stage == 2:
            # Stage 2 keeps level 1 exactly as stage 1 left it: no dropout, no batch-norm updates, mean latents.
            for module in self.stage_modules()["level1"]:
                module.eval()
        return self

    # --- forward -------------------------------------------------------------------------------------------
    def _check_labels(self, labels, inputs=None):
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}.")
        batch = next(((k, v.shape[0]) for k, v in (inputs or {}).items() if isinstance(v, torch.Tensor) and v.dim()),
                     None)
        if batch is not None and labels.dim() and labels.shape[0] != batch[1]:
            raise ValueError(f"labels has batch size {labels.shape[0]} (shape {tuple(labels.shape)}); the inputs have "
                             f"{batch[1]} ({batch[0]} has shape {tuple(inputs[batch[0]].shape)}). Expected one label "
                             "per sample.")
        if problem_type(self.config) == "regression":
            if self.config.problem_type is None and not labels.is_floating_point():
                raise ValueError(
                    f"labels are integers ({labels.dtype}) but num_labels=1 without problem_type means regression "
                    "(as in transformers). For binary classification use num_labels=2; for regression pass float "
                    "labels (or set problem_type='regression')."
                )
            if labels.dim() not in (1, 2) or not labels.is_floating_point():
                raise ValueError(f"regression labels must be a float tensor (batch,) ; got {labels.dtype} {tuple(labels.shape)}.")
            return
        if problem_type(self.config) == "multi_label_classification":
            self._check_multi_hot_labels(labels)
            return
        if labels.dim() != 1 or labels.is_floating_point():
            hint = (" For multi-hot labels (batch, num_labels) set problem_type='multi_label_classification'."
                    if labels.dim() == 2 and labels.shape[1] == self.num_labels else "")
            raise ValueError(f"labels must be an integer tensor of shape (batch,); got {labels.dtype} "
                             f"{tuple(labels.shape)}.{hint}")
        if labels.numel() and value_checks_enabled(self.config, labels):
            low, high = torch.stack([labels.amin(), labels.amax()]).tolist()
            if low < 0 or high >= self.num_labels:
                raise ValueError(f"labels must lie in [0, {self.num_labels}); got values from {low} to {high}.")

    def _check_multi_hot_labels(self, labels):
        shape = f"(batch, {self.num_labels})"
        if labels.dim() != 2 or labels.shape[1] != self.num_labels:
            raise ValueError(f"labels must be a multi-hot tensor of shape {shape} for problem_type="
                             f"'multi_label_classification' (one 0/1 entry per label); got {labels.dtype} "
                             f"{tuple(labels.shape)}.")
        if labels.numel() and value_checks_enabled(self.config, labels):
            low, high = torch.stack([labels.amin(), labels.amax()]).float().tolist()
            if not 0 <= low <= high <= 1:
                raise ValueError(f"multi-hot labels must lie in [0, 1]; got values from {low} to {high}.")

    def _task_loss(self, logits, labels):
        """Per-sample task loss: cross-entropy, the mean over labels of the binary cross-entropy for multi-label, or
        squared error for regression. `logits` `(..., batch, num_labels)` (e.g. one row of logits per head), `labels`
        `(batch,)` (multi-label: `(batch, num_labels)`) -> `(..., batch)`."""
        kind = problem_type(self.config)
        if kind == "regression":
            return (logits.squeeze(-1) - labels.view(-1).to(logits.dtype)).pow(2)
        if kind == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype).expand_as(logits),
                                                      reduction="none").mean(-1)
        if logits.dim() == 2:
            return F.cross_entropy(logits, labels, reduction="none")
        rows = logits.shape[:-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.expand(rows).reshape(-1),
                               reduction="none").view(rows)

    def forward(self, modality_mask=None, modality_corruption=None, labels=None, return_dict=None,
                output_hidden_states=None, output_attentions=None, **inputs) -> DmilClassifierOutput | tuple:
        r"""
        Args:
            modality_mask (`torch.BoolTensor` of shape `(batch_size, num_modalities)`, *optional*): per-sample
                presence of each modality (in `config.modalities` order); modalities not passed at all are absent.
            modality_corruption (`torch.FloatTensor` of shape `(batch_size, num_modalities)`, *optional*, training
                only): each modality's corruption level, from `dmil_hf.data.add_training_corruption` (see
                [`DmilModel.forward`]).
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class ids (floats for regression;
                multi-hot `(batch_size, num_labels)` for `problem_type="multi_label_classification"`).
            return_dict (`bool`, *optional*): return a [`DmilClassifierOutput`] (default: `config.return_dict`) or a
                tuple of its fields that are not None (`loss` first when labels are given, then `logits`).
            output_hidden_states / output_attentions (`bool`, *optional*): also return each tower's output with its
                hidden states / attention weights, as `<modality>_model_output` (see [`DmilModelOutput`]).
            **inputs: modality-prefixed tower inputs, e.g. `text_input_ids`, `text_attention_mask`,
                `vision_pixel_values`, `audio_input_values` / `audio_input_features`, `<name>_features`. An instance's
                `inspect.signature(model.forward)` lists them all, so `transformers.Trainer` keeps those columns.
        """
        return_dict, output_hidden_states, output_attentions = self._output_options(
            return_dict, output_hidden_states, output_attentions)
        if labels is not None:
            self._check_labels(labels, inputs)
        marginal = self.marginalizes_reliability
        out = self.dmil(modality_mask=modality_mask, modality_corruption=modality_corruption, return_dict=True,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                        reliability_subsets=marginal, **inputs)
        result = self.classify(out, labels, modality_corruption)
        if marginal:
            result = self._marginalize(result, out)
        towers = {key: out[key] for key in TOWER_OUTPUTS if key in out}
        if towers:  # rebuilt so the fields keep their tuple positions
            result = type(result)(**dict(result.items()), **towers)
        return result if return_dict else result.to_tuple()

    @property
    def marginalizes_reliability(self) -> bool:
        """Whether this forward pass marginalises over which modalities work (see
        `DmilConfig.reliability_marginalization`): at inference, single-label, with reliability heads (until they
        have learnt from corrupted rows every reliability is 1, and the result is the soft pass's)."""
        config = self.config
        return (not self.training and config.reliability_marginalization and config.reliability_gating
                and problem_type(config) == "single_label_classification")

    def _marginalize(self, result: DmilClassifierOutput, out: DmilModelOutput) -> DmilClassifierOutput:
        """`result` with `logits` (log-probabilities) replaced by their mixture over the subsets of modalities that may
        work, each subset's prediction made as if the others were missing, weighted by `out.subset_weights`; and with
        `interaction_weights` and `gate_weights` mixed over the subsets by their share of the evidence for the
        predicted class ([`subset_evidence`]): what the prediction rests on (loss and the other fields stay those of
        the soft pass)."""
        subsets = self.classify(out.subset_decomposition)
        weights = out.subset_weights.t().unsqueeze(-1)  # (V, B, 1)
        probabilities = subsets.logits.float().softmax(-1).view(*weights.shape[:2], -1)  # (V, B, C)
        marginal = (weights * probabilities).sum(0)
        evidence = subset_evidence(weights, probabilities, marginal.argmax(-1))

        def mix(values):
            return (evidence * values.view(*evidence.shape[:2], -1)).sum(0)

        # Heads never trained on corrupted rows trust every present modality: the mixture is the soft pass itself, whose
        # logits stay as they are (not turned into log-probabilities).
        logits = torch.where(self.dmil.reliability.calibrated > 0,
                             marginal.clamp(min=1e-30).log().to(result.logits.dtype), result.logits)
        return type(result)(**{**dict(result.items()), "logits": logits,
                               "interaction_weights": mix(subsets.interaction_weights),
                               "gate_weights": mix(subsets.gate_weights)})

    def _synergy_view_losses(self, embeds, valid, labels):
        """`(total, count)` per sample: the synergy head's summed task loss on the extra synergy latents `embeds`
        `(B, V, latent)` (each pair's, or each leave-one-out subset's) where `valid` `(B, V)` holds, and how many."""
        losses = self._task_loss(self.synergy_head(embeds).transpose(0, 1), labels)
        valid = valid.t().to(losses.dtype)
        return (losses * valid).sum(0), valid.sum(0)

    def _reliability_responsibility_terms(self, out: DmilModelOutput, labels, corruption) -> dict:
        """The reliability terms with the learned target of the partly corrupted rows (see
        `DmilConfig.reliability_partial_target` and [`DmilReliability.responsibility_terms`])."""
        corruption = corruption.to(out.modality_mask.device, torch.float32)
        return self._responsibility_terms(out.reliability_logits, out.modality_mask, corruption, out.partial_rows,
                                          out.partial_modalities, out.partial_decomposition, labels)

    def _responsibility_terms(self, logits, mask, corruption, rows, learned, decomposition, labels) -> dict:
        """The reliability heads' terms (`logits` `(B, M)`) against `_responsibility_target`."""
        return self.dmil.reliability._terms(
            logits, self._responsibility_target(corruption, rows, learned, decomposition, labels), mask)

    def _responsibility_target(self, corruption, rows, learned, decomposition, labels):
        """[`DmilReliability.responsibility_target`] with the two paths' log-probabilities of the true label read from
        their decomposition (`DmilModel.partial_paths`)."""
        with torch.no_grad():
            log_p = self.classify(decomposition).logits.float().log_softmax(-1)
            log_p_y = log_p.gather(-1, labels[rows].repeat(2).unsqueeze(-1)).squeeze(-1)
        count = rows.shape[0]
        return self.dmil.reliability.responsibility_target(corruption, rows, learned, log_p_y[:count],
                                                           log_p_y[count:])

    def classify(self, out: DmilModelOutput, labels=None, modality_corruption=None) -> DmilClassifierOutput:
        """Heads, gate and stage loss on top of the decomposition `out` of [`DmilModel`] (`modality_corruption`: the
        training corruption levels, whose corrupted modalities the unimodal and component losses skip)."""
        config = self.config
        mask, component_mask = out.modality_mask, out.component_mask
        stage = config.training_stage
        # Each modality's weight: its presence, times its reliability where the model estimates one.
        trust = mask.float() if out.modality_reliability is None else out.modality_reliability
        clean = mask if modality_corruption is None else mask & (modality_corruption.to(mask.device) <= 0)

        # The stacked heads read group-first inputs `(groups, B, width)` and return `(groups, B, num_labels)`.
        with torch.set_grad_enabled(torch.is_grad_enabled() and stage != 2):
            unimodal_first = self.unimodal_heads(out.task_relevant_embeds.transpose(0, 1))
        unimodal_logits = unimodal_first.transpose(0, 1)
        component_embeds = out.component_embeds
        components_first = torch.cat([self.component_heads(component_embeds[:, :-1].transpose(0, 1)),
                                      self.synergy_head(component_embeds[:, -1]).unsqueeze(0)], 0)  # (K, B, labels)
        component_logits = components_first.transpose(0, 1)
        gate_logits = self.gate(component_embeds.flatten(1))
        if out.modality_reliability is not None:  # a component that needs an unreliable modality loses its weight
            reliable_components = component_reliability(trust)
            gate_logits = gate_logits + reliable_components.clamp(min=1e-4).log().to(gate_logits.dtype)
        gate_logits = gate_logits.masked_fill(~component_mask, float("-inf"))
        weights = gate_logits.softmax(-1)
        mixed = component_logits
        if modality_corruption is not None:
            # A sample with a corrupted modality trains the gate (to rest on the modalities that still work), not the
            # components' predictions: many such samples are unpredictable (synergy without one addend), and their
            # labels would teach the components noise.
            corrupted = (mask & ~clean).any(1)
            mixed = torch.where(corrupted[:, None, None], component_logits.detach(), component_logits)
        gated = (weights.unsqueeze(-1) * mixed).sum(1)
        if stage == 1:
            present = trust.unsqueeze(-1).to(unimodal_logits.dtype)
            logits = (unimodal_logits * present).sum(1) / present.sum(1).clamp(min=1e-6)
        else:
            logits = gated
        # A single output (regression, or num_labels=1) has no class distribution to split: the readout is the gate.
        # Multi-label splits the information about the predicted label set (see `pointwise_interaction_weights`).
        multi_label = problem_type(config) == "multi_label_classification"
        regression = not multi_label and (config.problem_type == "regression" or config.num_labels == 1)
        if labels is not None and self.training and not regression:
            self.label_prior.update(labels)
        modality_first = self.modality_heads(out.modality_embeds.detach().transpose(0, 1))
        modality_logits = modality_first.transpose(0, 1)
        if regression:
            readout = weights
        else:
            with torch.no_grad():
                # Components that need an unreliable modality are as good as absent for the readout too.
                available = component_mask if out.modality_reliability is None else (
                    reliable_components * component_mask)
                readout = pointwise_interaction_weights(modality_logits, logits, trust, self.label_prior.log_prior(),
                                                        available, multi_label=multi_label)

        terms = dict(out.loss_terms)
        loss = None
        if labels is not None:
            # The components learn from the samples whose modalities they read are intact (redundancy: all
            # samples; it reads the reliable modalities), and with `partial_corruption_weights` from those whose
            # modalities are partly noised; each sample weighs the product of its modalities' weights.
            usable = clean.to(gated.dtype)
            partial_weights = None if modality_corruption is None else config.partial_corruption_weights()
            if partial_weights is not None and any(partial_weights.values()):
                level = modality_corruption.to(mask.device)
                partial = mask & (level > 0) & (level < 1)
                weight = usable.new_tensor([partial_weights[m] for m in config.modalities])
                usable = usable + weight * partial.to(usable.dtype)
            intact = torch.where(mask, usable, 1.0).prod(1, keepdim=True)
            component_trained = component_mask * torch.cat([torch.ones_like(intact), usable, intact], 1)
            # Every head's task loss in one call: the gated prediction, the unimodal heads, the readout's heads, the
            # component heads, each averaged over the samples it learns from (weighted).
            heads = torch.cat([gated.unsqueeze(0), unimodal_first, modality_first, components_first], 0)
            learns = torch.cat([torch.ones_like(intact), usable, mask.to(usable.dtype), component_trained], 1)
            losses = self._task_loss(heads, labels)
            if out.synergy_pair_embeds is not None:
                # The synergy component learns from its pooled latent and from each present pair's alone (the mean).
                total, count = self._synergy_view_losses(out.synergy_pair_embeds, out.synergy_pair_mask, labels)
                losses = torch.cat([losses[:-1], ((losses[-1] + total) / (1.0 + count)).unsqueeze(0)], 0)
            if out.synergy_subset_embeds is not None:
                # ... and, weighted, from the mean over the leave-one-out subsets that keep two modalities.
                total, count = self._synergy_view_losses(out.synergy_subset_embeds, out.synergy_subset_mask, labels)
                subset_loss = config.synergy_subset_weight * (total / count.clamp(min=1.0))
                losses = torch.cat([losses[:-1], (losses[-1] + subset_loss).unsqueeze(0)], 0)
            # With the gate's weight on synergy (over the samples that have it): every term in one masked mean.
            modalities = config.modalities
            names = (["task_gated"] + _names("task_unimodal_{}", modalities) + _names("readout_{}", modalities)
                     + _names("task_component_{}", config.component_names) + ["gate_synergy"])
            rows = torch.cat([losses, weights[:, -1:].t().to(losses.dtype)])
            used = torch.cat([learns, component_mask[:, -1:].to(learns.dtype)], 1).t()
            terms.update(_by_name(names, _masked_means(rows, used)))
            if out.partial_decomposition is not None:
                terms.update(self._reliability_responsibility_terms(out, labels, modality_corruption))
            loss = self._stage_loss(terms, stage)
        return DmilClassifierOutput(
            loss=loss,
            logits=logits,
            interaction_weights=readout,
            gate_weights=weights,
            component_logits=component_logits,
            unimodal_logits=unimodal_logits,
            modality_logits=modality_logits,
            component_embeds=component_embeds,
            modality_embeds=out.modality_embeds,
            modality_mask=mask,
            loss_terms=terms,
            component_names=config.component_names,
            modality_reliability=out.modality_reliability,
        )

    def _stage_loss(self, terms, stage):
        # Parsimony (`synergy_gate_penalty`): synergy sees every modality, so without a price the gate would route
        # everything through it. The readout's heads read detached embeddings, so their term trains them only.
        return evaluate_loss(STAGE_LOSSES[stage], terms, self.config)



# --- checkpoints of the per-modality layout -----------------------------------------------------------------------
# Until the head's per-modality layers were stacked (`DmilGroupedLinear`), each was a module of its own in an
# `nn.ModuleDict` keyed by modality (`dmil.relevant.<modality>.proj.weight`), and the component heads an
# `nn.ModuleList` (`component_heads.<k>.weight`, the last one synergy's). Such checkpoints load through transformers'
# conversion mapping, the mechanism that merges the experts of MoE checkpoints: `from_pretrained` stacks their tensors
# into the grouped parameters, and `save_pretrained(..., save_original_format=True)` writes that layout again.

def _old_key_pattern(old_key: str) -> str:
    """The regex of a per-modality key (`{}`: the modality or component index), with or without the `dmil.` prefix
    of the base model inside the classifier."""
    before, after = old_key.split("{}")
    return rf"^(?:{DmilPreTrainedModel.base_model_prefix}\.)?{re.escape(before)}(\w+){re.escape(after)}$"


def _new_key_pattern(new_key: str) -> str:
    return rf"^(?:{DmilPreTrainedModel.base_model_prefix}\.)?{re.escape(new_key)}$"


def _group_names(config, components: bool) -> list[str]:
    """What the `{}` of the per-modality keys takes, in the order of the stacked groups."""
    return [str(k) for k in range(len(config.component_names))] if components else list(config.modalities)


class DmilLayoutConverter(WeightConverter):
    """
    A `WeightConverter` whose operation receives every tensor under its full checkpoint key. The stock operations
    (`MergeModulelist`) stack tensors in the order of their keys, which sorts modalities alphabetically; DMIL stacks
    them in `config.modalities` order (text, vision, audio, then the feature modalities), so it reads the modality
    from each key.
    """

    __slots__ = ("source_keys",)

    def __init__(self, source_patterns, target_patterns, operations, force_cpu: bool = False):
        super().__init__(source_patterns, target_patterns, operations, force_cpu=force_cpu)
        self.source_keys = {}

    def add_tensor(self, target_key, source_key, source_pattern, future):
        super().add_tensor(target_key, source_key, source_pattern, future)
        self.source_keys.setdefault(source_pattern, []).append(source_key)

    def materialize_tensors(self):
        keyed = {}
        for pattern, tensors in super().materialize_tensors().items():
            keys = self.source_keys.pop(pattern, [])
            if len(keys) != len(tensors):
                raise ValueError(f"{len(tensors)} tensors were read for {keys}; expected one per key.")
            keyed.update(zip(keys, tensors))
        return keyed

    def reverse_transform(self):
        reverse = self.operations[0].reverse_op.converter()
        reverse.scope_prefix, reverse.base_model_prefix = self.scope_prefix, self.base_model_prefix
        return reverse


class DmilStackGroups(ConversionOps):
    """Stack the per-modality tensors `old_key.format(name)` into the grouped parameter `new_keys[0]`, in the order of
    `_group_names`; for the component heads (`components=True`) the last one, synergy's, becomes `new_keys[1]`."""

    def __init__(self, old_key: str, new_keys: tuple[str, ...], components: bool = False):
        self.old_key, self.new_keys, self.components = old_key, tuple(new_keys), components

    def converter(self) -> DmilLayoutConverter:
        return DmilLayoutConverter(_old_key_pattern(self.old_key), list(self.new_keys), [self])

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, config=None, full_layer_name=None, **kwargs):
        pattern = re.compile(source_patterns[0])
        found = {pattern.search(key).group(1): tensor for key, tensor in input_dict.items()}
        names = _group_names(config, self.components)
        if sorted(found) != sorted(names):
            raise ValueError(f"the checkpoint holds {self.old_key!r} for {sorted(found)}; this model's config expects "
                             f"{names}.")
        stacked = torch.stack([found[name] for name in names])
        if not self.components:
            return {full_layer_name: stacked}
        prefix = full_layer_name[: len(full_layer_name) - len(self.new_keys[0])]
        return {full_layer_name: stacked[:-1], prefix + self.new_keys[1]: stacked[-1]}

    @property
    def reverse_op(self) -> ConversionOps:
        return DmilUnstackGroups(self.old_key, self.new_keys, self.components)


class DmilUnstackGroups(DmilStackGroups):
    """The inverse of [`DmilStackGroups`]: one tensor per modality (or component) under its per-modality key."""

    def converter(self) -> DmilLayoutConverter:
        patterns = [_new_key_pattern(key) for key in self.new_keys]
        return DmilLayoutConverter(patterns, self.new_keys[0], [self])

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, config=None, **kwargs):
        parts, prefix = {}, ""
        for key, tensor in input_dict.items():
            new_key = next(k for k in self.new_keys if key.endswith(k))
            prefix, parts[new_key] = key[: len(key) - len(new_key)], tensor
        tensors = list(parts[self.new_keys[0]].unbind(0)) + ([parts[self.new_keys[1]]] if self.components else [])
        names = _group_names(config, self.components)
        if len(tensors) != len(names):
            raise ValueError(f"{self.new_keys[0]!r} holds {len(tensors)} groups; this model's config has {names}.")
        # Copies: the slices of one stacked tensor share its storage, which safetensors refuses to save.
        return {prefix + self.old_key.format(name): tensor.clone() for name, tensor in zip(names, tensors)}

    @property
    def reverse_op(self) -> ConversionOps:
        return DmilStackGroups(self.old_key, self.new_keys, self.components)


# The per-modality key of each stacked parameter (`{}`: the modality), then the component heads (`{}`: the index).
_PER_MODALITY_KEYS = {
    f"{module}.{{}}.{layer}{leaf}": f"{module}.{layer}{leaf}"
    for module, layers in (("relevant", ("proj.",)), ("irrelevant", ("proj.",)), ("reconstruct", ("0.", "2.")),
                           ("redundancy_from", ("proj.",)), ("unique", ("proj.",)),
                           ("reconstruct_relevant", ("0.", "2.")), ("unimodal_heads", ("",)),
                           ("modality_heads", ("0.", "2.")))
    for layer in layers for leaf in ("weight", "bias")
}
CHECKPOINT_CONVERSIONS = (
    [DmilStackGroups(old, (new,)).converter() for old, new in _PER_MODALITY_KEYS.items()]
    + [DmilStackGroups(f"component_heads.{{}}.{leaf}", (f"component_heads.{leaf}", f"synergy_head.{leaf}"),
                       components=True).converter() for leaf in ("weight", "bias")]
)
# Registered by the model type (the baselines have their own); `overwrite`: the file runs again when a checkpoint's
# copy of it is loaded with `trust_remote_code`.
register_checkpoint_conversion_mapping(DmilConfig.model_type, CHECKPOINT_CONVERSIONS, overwrite=True)


__all__ = [
    "MAX_INPUT_MAGNITUDE",
    "DmilClassifierOutput",
    "DmilEncoders",
    "DmilFeatureTower",
    "DmilForMultimodalClassification",
    "DmilGroupedLinear",
    "DmilModel",
    "DmilModelOutput",
    "DmilPreTrainedModel",
    "DmilReliability",
    "STAGE_LOSSES",
    "component_reliability",
    "drop_modalities",
    "describe_loss",
    "evaluate_loss",
    "loss_coefficients",
    "pointwise_interaction_weights",
    "subset_evidence",
    "subset_posterior",
]
