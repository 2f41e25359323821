# Travels to the Hub with every checkpoint: imports only the standard library, torch and transformers.
"""DMIL configuration: one sub-config per modality tower plus the decomposition head and its losses."""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import inspect
import keyword

from transformers import AutoConfig, AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_MAPPING


@dataclasses.dataclass(frozen=True)
class TowerModality:
    """
    One tower modality of the input schema, everywhere it appears: its dataset column (`rate_column`: the column
    with its sampling rate), the `DmilProcessor` argument and sub-processor (with its Auto class) that prepare it, and
    the main inputs its tower may take (name -> rank, batch first; `float_inputs`: those that must be floating
    point). The processor's outputs and the model's inputs are prefixed by `name`.
    """

    name: str
    column: str
    processor_argument: str
    sub_processor: str
    auto_class: type
    main_inputs: dict[str, int]
    float_inputs: tuple[str, ...] = ()
    rate_column: str | None = None


TOWERS = {tower.name: tower for tower in (
    TowerModality("text", column="text", processor_argument="text", sub_processor="tokenizer",
                  auto_class=AutoTokenizer, main_inputs={"input_ids": 2}),
    TowerModality("vision", column="image", processor_argument="images", sub_processor="image_processor",
                  auto_class=AutoImageProcessor, main_inputs={"pixel_values": 4}, float_inputs=("pixel_values",)),
    TowerModality("audio", column="audio", processor_argument="audio", sub_processor="feature_extractor",
                  auto_class=AutoFeatureExtractor, main_inputs={"input_values": 2, "input_features": 3},
                  float_inputs=("input_values", "input_features"), rate_column="audio_sampling_rate"),
)}
TOWER_MODALITIES = tuple(TOWERS)
# A feature modality `<name>` is the dataset column `<name>_features` and the model input `<name>_features`.
FEATURES = "features"
# The training-only model input `(batch, num_modalities)` (and dataset column) of each modality's corruption level in
# `config.modalities` order (0 clean, 1 replaced by noise): `dmil_hf.data.add_training_corruption` writes it; DMIL
# learns its per-modality reliability from it, and no method reads it at inference.
CORRUPTION_INPUT = "modality_corruption"
# Modality dropout by model type where `DmilConfig.modality_dropout` is None: DMIL trains its missing-modality path;
# the plain baselines train as published (the benchmark's `joint_robust` row asks for it explicitly).
DEFAULT_MODALITY_DROPOUT = {"dmil": 0.1}
# Dropout on the projected embeddings of frozen (or cached) towers by model type where
# `DmilConfig.frozen_tower_dropout` is None; the other model types use `dropout` there too.
DEFAULT_FROZEN_TOWER_DROPOUT = {"dmil": 0.5}
# The weight of partly corrupted training rows in the components' losses, for frozen (or cached) towers, by model type
# where `DmilConfig.partial_corruption_weight` is None; other modalities, and other model types, weigh them 0.
DEFAULT_FROZEN_TOWER_PARTIAL_WEIGHT = {"dmil": 0.3}
# The main inputs each tower kind may have; a config whose model does not take one of these is refused.
TOWER_INPUTS = {name: tuple(tower.main_inputs) for name, tower in TOWERS.items()}
RESERVED_NAMES = (frozenset(TOWERS) | {tower.column for tower in TOWERS.values()}
                  | {"labels", "modality", "interaction"})


def column_of(modality: str) -> str:
    """The dataset column holding `modality`: a tower's column (text, image, audio), else `<modality>_features`."""
    return TOWERS[modality].column if modality in TOWERS else f"{modality}_{FEATURES}"


# Keywords every transformers config accepts or writes into config.json (besides the dataclass fields of
# PretrainedConfig, which are added below): a DmilConfig takes these and refuses any other unknown keyword.
_STANDARD_CONFIG_KEYS = frozenset({
    "num_labels", "torch_dtype", "name_or_path", "_name_or_path", "_commit_hash", "output_attentions",
    "attn_implementation", "experts_implementation", "_attn_implementation_internal",
    "_experts_implementation_internal", "model_type", "auto_map", "transformers_version", "architectures",
    "use_cache", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "tokenizer_class", "prefix", "finetuning_task", "task_specific_params",
    "custom_pipelines", "base_model_tp_plan", "base_model_pp_plan",
}) | {field.name for field in dataclasses.fields(PretrainedConfig)}
# True while a config is rebuilt from a saved dict: keys someone set as attributes and saved are kept then.
_FROM_SAVED_DICT = contextvars.ContextVar("dmil_config_from_saved_dict", default=False)
# What the reliability heads learn on a row whose modality is only partly noised (see the field's docs).
RELIABILITY_PARTIAL_TARGETS = ("level", "responsibility")
# Fields whose default changed, with the value that configs saved before the field existed get (the behaviour they
# were saved with): `reliability_marginalization` and `synergy_subset_weight` became defaults after they had been opt-in
# fields, the synergy MLP's width had been `hidden_size` before `synergy_hidden_size` existed, and the reliability heads
# had read detached tower outputs before `reliability_tower_gradient`, no model refitted its heads before
# `reliability_refit_steps`, nor on a copy of its own before `reliability_refit_corruption`. A callable derives the
# value from the saved dict: frozen towers had `dropout` like every other modality before `frozen_tower_dropout`.
_DEFAULTS_BEFORE = {"reliability_marginalization": False, "synergy_hidden_size": None, "synergy_subset_weight": 0.0,
                    "reliability_tower_gradient": 0.0, "reliability_partial_target": "level",
                    "reliability_refit_steps": 0, "reliability_refit_corruption": None,
                    "partial_corruption_weight": 0.0,
                    "frozen_tower_dropout": lambda saved: saved.get("dropout", 0.1)}


def _as_config(value, field: str) -> PretrainedConfig | None:
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"`{field}` is a dict without 'model_type'; expected a transformers config dict.")
        try:
            return AutoConfig.for_model(model_type, **value)
        except ValueError as err:
            raise ValueError(f"`{field}` has model_type {model_type!r}, which transformers does not know.") from err
    raise TypeError(f"`{field}` must be a PretrainedConfig, a dict or None; got {type(value).__name__}.")


def _check_tower_kind(config: PretrainedConfig, modality: str) -> None:
    """Refuse a sub-config whose AutoModel does not take this modality's main input (e.g. a ViT as text tower)."""
    if type(config).sub_configs:
        raise TypeError(
            f"`{modality}_config` is a composite {type(config).__name__} (with {sorted(type(config).sub_configs)}); "
            f"pass the config of a single {modality} encoder instead."
        )
    try:
        model_class = MODEL_MAPPING[type(config)]
    except KeyError:
        raise TypeError(
            f"`{modality}_config` is a {type(config).__name__}, which AutoModel cannot build; expected an encoder "
            f"config whose model takes {' or '.join(TOWER_INPUTS[modality])}."
        ) from None
    main_input = getattr(model_class, "main_input_name", None)
    if main_input not in TOWER_INPUTS[modality]:
        raise TypeError(
            f"`{modality}_config` is a {type(config).__name__}, whose model takes {main_input!r}; a {modality} tower "
            f"must take {' or '.join(repr(n) for n in TOWER_INPUTS[modality])}."
        )


def _per_modality(values, modalities, field: str) -> dict[str, float]:
    """Expand a float, a sequence (in modality order; the last value repeats) or a dict to one weight per modality."""
    if isinstance(values, (int, float)):
        return {m: float(values) for m in modalities}
    if isinstance(values, dict):
        unknown = set(values) - set(modalities)
        if unknown:
            raise ValueError(f"`{field}` names unknown modalities {sorted(unknown)}; modalities are {list(modalities)}.")
        default = sum(values.values()) / max(len(values), 1)
        return {m: float(values.get(m, default)) for m in modalities}
    values = list(values)
    if not values:
        raise ValueError(f"`{field}` is empty; expected one weight per modality.")
    return {m: float(values[min(i, len(values) - 1)]) for i, m in enumerate(modalities)}


class DmilConfig(PretrainedConfig):
    r"""
    Configuration of a DMIL model: the modality towers, the two-level decomposition head, its loss weights and
    the three-stage training schedule.

    Args:
        text_config / vision_config / audio_config (`PretrainedConfig` or `dict`, *optional*):
            Config of the tower for that modality (any transformers encoder whose model takes `input_ids`,
            `pixel_values`, or `input_values`/`input_features` respectively). Omit a modality to leave it out.
        feature_modalities (`dict[str, int]`, *optional*):
            Precomputed feature-vector modalities, name -> input width (e.g. `{"acoustic": 74}`).
        num_labels (`int`): number of classes (1 with `problem_type="regression"`; the number of labels with
            `problem_type="multi_label_classification"`, whose labels are multi-hot `(batch, num_labels)`).
        hidden_size (`int`, defaults to 64): width every tower is projected to.
        latent_size (`int`, defaults to 32): width of every latent (task-relevant/-irrelevant, R, U, S).
        feature_hidden_size (`int`, defaults to 128): hidden width of the built-in feature towers.
        gate_hidden_size (`int`, defaults to 64): hidden width of the per-sample gate.
        synergy_hidden_size (`int`, *optional*, defaults to 256): hidden width of the synergy component's MLP (each
            pair's with `synergy_structure="pairs"`); `None`: `hidden_size` (configs saved before this field
            existed). The synergy MLP is the one component that reads every modality at once, and it ends up
            answering for every kind of sample; at `hidden_size` (64) wide, losing a modality that a sample never
            needed (the third one of a pair's synergy) cost many samples of other kinds too. With
            `synergy_subset_weight=2` (they were chosen together), against 64 wide without subsets, 3 seeds each
            (BENCHMARKS.md, "Round 4"): `digits-pretrained` (make run's command) validation 90.2 -> 90.1, test 87.3
            -> 89.4, the text's validation gaps missing / noise / blank 3.3 / 4.1 / 3.4 -> 1.7 / 2.8 / 1.3 points;
            `synthetic3` validation 96.6 -> 96.4, test 95.9 -> 96.4, a lost third modality's test gaps missing /
            noise / blank 7.6 / 10.2 / 16.1 -> 4.3 / 6.7 / 9.9; `synthetic` (two modalities: the width alone)
            validation 98.2 -> 98.5, test 96.9 -> 97.5. Together they make a bare training step on feature data
            about 10% slower (BENCHMARKS.md, "Round 4").
        tower_pooling (`str`, defaults to `"mean"`): `"mean"` takes the masked mean of `last_hidden_state`
            (spatial mean for convolutional towers); `"auto"` uses `pooler_output` when a tower has one, else the
            mean; `"cls"` the first token. The mean is the default because it trains randomly initialised towers far
            faster than a fresh CLS pooler (on `digits`, joint learning's unique-vision accuracy went from near
            chance to about a third in the same epochs) and suits sentence-embedding checkpoints such as MiniLM.
        synergy_source (`str`, defaults to `"towers"`): what the synergy component is built from (each modality's
            vector and the pairwise element-wise products): `"irrelevant"` (the paper: the task-irrelevant latents),
            `"all"` (task-relevant latents too), `"embeddings"` (the projected tower embeddings that the bottlenecks
            also read) or `"towers"` (each tower's pooled output through the synergy component's own projection). On
            `synthetic` (validation split, 4/4/16 epochs), DMIL's synergy accuracy was 0.52 with `"all"` and 0.92 with
            `"embeddings"`: the variational bottlenecks keep what each modality predicts alone and drop the fine
            detail that only matters in combination. `"towers"` goes one step further: what synergy needs from a
            tower no longer has to share one embedding with what the bottlenecks and the unimodal heads need. On two
            unseen feature datasets (user-dataset path, validation, one seed) it raised synergy accuracy from 49.7 to
            89.9 and from 24.9 to 65.0 (joint learning: 91.8 and 59.9), on `synthetic` to 0.99, and on `digits` (3
            seeds) overall accuracy from 67.2 to 69.7 (with `synergy_tower_gradient=0.25`).
        synergy_structure (`str`, defaults to `"joint"`): how the synergy component combines the modalities.
            `"pairs"`: one small MLP per pair of modalities `(i, j)` on `[v_i, v_j, v_i ⊙ v_j]`, the pairs pooled per
            sample by a learned attention over the pairs that are present (and reliable), each pair also trained to
            predict alone, so that a synergy of two modalities survives the loss of a third. `"joint"`: one MLP over
            every modality's vector and all pairwise products (the paper's form). With two modalities both are the
            same function. On `synthetic3` (three feature modalities, synergy between `a` and `b`), `"joint"` lost 16
            points on synergy samples when `c`, which synergy never needs, was missing, `"pairs"` 1 (one seed); over
            3 seeds `"pairs"` (with `reliability_marginalization`) cut the gap of a missing `c` from 7.7 to 3.4 points
            but lowered clean accuracy from 95.8 to 94.1, so it is not the default (BENCHMARKS.md).
        synergy_tower_gradient (`float`, defaults to 0.25): with `synergy_source="towers"`, the factor on the gradient
            the synergy component sends into the towers in stage 3 (its own projections always get the full
            gradient; the stage-1 warm-up sends none). At 1 the towers learn what synergy needs as fast as in joint
            learning, and like joint learning they then lose what each modality knows alone: on `digits` (2 seeds)
            overall accuracy fell to 62.1 with 1.0, against 69.2-71.3 with 0.25.
        synergy_gate_penalty (`float`, defaults to 0.1): price (stages 2-3) on the gate weight of the synergy
            component, so the gate uses it only where the simpler components cannot explain the sample.
        synergy_subset_weight (`float`, defaults to 2.0): with three or more modalities and `synergy_structure=
            "joint"`, in training, the synergy component also predicts from each leave-one-out subset of the
            modalities (the left-out one read as missing, one more batched pass of its MLP) and its task loss gains
            this weight times the mean loss of those subsets (the subsets that keep two modalities). A synergy of two
            modalities then learns to survive the loss of a third that it never needed, and to stay uncertain where
            one it needs is gone. Measured with `synergy_hidden_size` (above); at 0.5 with the 64-wide MLP it had
            cost `digits-pretrained` a point of validation accuracy. 0 is the paper (and configs saved before this
            field existed).
        dropout (`float`, defaults to 0.1): dropout on the projected tower embeddings (and the synergy component's
            per-modality views) of feature vectors and towers that train.
        frozen_tower_dropout (`float`, *optional*): the same dropout for the towers of `freeze_towers` (frozen, and
            cached in training). `None` (default): the model type's default (`frozen_tower_dropout_probability`: 0.5
            for DMIL; `dropout` for the baselines, which a config converted between methods keeps). On fixed
            embeddings the head alone learns, and the synergy component memorised `digits-pretrained`'s digit pairs
            (100% of training, 69% of validation synergy samples). Measured on its validation split (BENCHMARKS.md,
            "Round 9", 3 seeds): 0.1 (`dropout`) 90.8, 0.3 92.2, 0.5 93.4, 0.7 92.3; on `digits`, whose towers train
            from scratch, 0.3 on every tower cost 5 points, hence the rule by tower kind. Configs saved before this
            field keep `dropout` for every tower.
        lamb (`float`, defaults to 0.2): scale of every KL / alignment term.
        kl_scale (`float`, defaults to 0.1): extra factor inside the model on every KL.
        level1_kl_weights / level1_reconstruction_weights: per-modality weights of stage 1 (a float, a list in
            modality order whose last value repeats, or a dict); defaults are the released two-modality values.
        stage2_reconstruction_weight, stage2_component_weight: stage-2 weights (0.025, 0.5).
        stage3_unimodal_weight, stage3_level2_scale, stage3_component_weight, stage3_reconstruction_weight:
            stage-3 weights (0.5, 0.4, 0.8, 0.01).
        stage3_level1_tower_gradient (`float`, defaults to 1.0): in stage 3, the factor on the gradient that level 1
            (and the redundancy/uniqueness components built on it) sends into the towers; the forward pass is
            unchanged. 1 is the paper. Lower values let the towers learn from the fusion faster: on `synthetic`
            (validation, 3 seeds) 0.25 raised synergy accuracy from 90.7 to 96.9 but cost robustness to a noised
            modality, and on `digits` (held-out voices and templates) it lowered overall accuracy from 71.7 to 64.3.
        stage1_synergy_weight (`float`, defaults to 1.0): weight of the synergy component's own task loss in stage 1,
            where it warms up on *detached* inputs: it learns from the towers as stage 1 shapes them, without shaping
            them (0 is the paper: synergy first trains in stage 2). Any positive value acts the same under AdamW (the
            loss is the only one on those parameters in stage 1). Synergy is the hardest component to fit (a function
            of several modalities at once) and the paper's schedule gives it the fewest epochs: on `synthetic`
            (validation, 3 seeds) the warm-up raised DMIL's synergy accuracy from 89.0 to 95.5 (overall 96.0 to
            97.9); on `digits` (held-out voices and templates, 2 seeds) overall accuracy went from 69.8 to 70.0.
            Letting its gradient reach the towers in stage 1 (joint learning's signal from the first step) did as well
            on `synthetic` but lowered `digits` to 67.0, so the warm-up is detached.
        stage1_epochs / stage2_epochs / stage3_epochs, stage1_learning_rate / ...: the schedule presets used by
            `dmil_hf.training` (4 / 4 / 16 epochs at 2e-3, with `TrainingArguments`' optimizer, AdamW); read them
            as objects through `stages` / `scheduled_stages`. Stage 3 is the longest: it trains the towers with every
            loss at once (the unimodal ones included), which synergy needs; stage 2 has them frozen.
        training_stage (`int`, defaults to 3): the stage the forward pass computes losses for; stage 1 predicts
            with the mean of the unimodal heads, stages 2 and 3 with the gated components.
        check_input_values (`bool`, *optional*): the value checks of `forward` (finite inputs of sane magnitude,
            token ids inside the vocabulary, labels inside `[0, num_labels)`), which read tensor values and so cost a
            device-to-host sync. `None` (default): run them in eager mode on CPU tensors only, where that costs no
            sync; `True`: in eager mode on any device (one sync per forward); `False`: never. Under `torch.compile`,
            `torch.export` and tracing they are always skipped. Shape, rank and dtype checks always run.
        reliability_gating (`bool`, defaults to `True`): DMIL's per-sample, per-modality reliability
            (`outputs.modality_reliability`, in [0, 1]): a small head on each tower's detached pooled output, trained
            on the corrupted training samples of `dmil_hf.data.add_training_corruption` (the `modality_corruption`
            input) to tell a working modality from a broken one. A modality judged unreliable is handled like a
            missing one, smoothly: the components that need it lose gate weight, redundancy comes from the
            reliable modalities, synergy stops reading it, and the readout's `unique_<m>` drops. A model never shown
            corrupted samples keeps every reliability at 1 (the head is untrained). `False` is the paper.
        reliability_marginalization (`bool`, defaults to `True`): at inference (single-label), once the reliability
            heads have learnt from corrupted rows, predict by marginalising over which modalities work: the
            prediction is the mixture, over the subsets of the present modalities, of the model's prediction with
            only that subset (the others as if missing), each weighted by the probability that exactly that subset
            works (independent modalities, each working with its reliability). A modality with reliability 0.3 then
            means "missing with probability 0.7", the path modality dropout trains, rather than a 0.3-scaled input
            the model never saw. The reliabilities need not be calibrated for this: on `digits` a clean held-out
            sentence gets a text reliability of about 0.7-0.8 (noise about 0.25), and the mixture keeps its
            prediction where the text-missing path has nothing to go on, while a noised one falls to that path. It
            costs one pass of the head per subset (`2^M - 1`, as one batch; the towers run once); `logits` are then
            log-probabilities. Models whose heads never saw corrupted rows are unchanged (every reliability is 1).
            Measured (BENCHMARKS.md, "Marginalisation by default"): on `digits-pretrained` (make run's command, 2
            seeds) validation accuracy 91.2 / 88.0 -> 91.2 / 88.7 and test 88.5 / 83.3 -> 90.0 / 84.5 (the text's
            own samples 85.0 -> 94.2 on seed 0), the degradation gaps within a point either way; on `digits` with tiny
            random towers (2 seeds) validation 71.0 / 62.0 -> 73.3 / 66.7 and test 68.0 / 64.7 -> 73.8 / 69.3; on
            `synthetic` and `synthetic3` (3 seeds each) test accuracy moved by at most 0.5 per seed. `False` (the paper, and configs
            saved before this field existed): the reliabilities only scale the gate and the inputs (the soft gating,
            the only mode in training).
        reliability_loss_weight (`float`, defaults to 1.0): weight of the reliability heads' loss (binary
            cross-entropy against 1 - corruption level, in every stage).
        reliability_tower_gradient (`float`, defaults to 0.25): in stage 3, the factor on the gradient that the
            reliability loss of the *corrupted* training rows sends into the text, image and audio towers that train
            (trained towers, LoRA adapters): a tower learns to show when its input is broken, which a head on the
            output of a tower trained only for the task could not tell (the tiny ViT's outputs for a noised image
            and one noised at 70% looked alike: reliability 0.33 and 0.38). Clean rows, stages 1-2, frozen and
            cached towers and the built-in feature towers send none (a feature tower shaped this way read partly
            noised vectors worse). 0 (configs saved before this field existed): the heads read detached tower
            outputs throughout.
        reliability_partial_target (`str`, defaults to `"responsibility"`): what the reliability heads learn on a
            training row whose modality is partly noised (`0 < modality_corruption < 1`; clean rows still learn 1 and
            rows whose modality was replaced by noise 0). `"level"` (configs saved before this field existed): `1 -`
            the noise level, how much signal went in, whatever the model can still make of it. `"responsibility"`
            (stages 2 and 3, single-label): how far the modality still helps that row: the model predicts the row
            twice (no gradient), trusting the modality and with it left out, and the head learns the trusted path's
            share of the label's probability, `p_trusted(y) / (p_trusted(y) + p_left_out(y))` (its responsibility in
            the mixture that marginalisation computes at inference; 1/2 where both predict alike). A partly noised
            modality that still carries the label keeps its weight, one that only misleads loses it. Measured
            (BENCHMARKS.md, "Round 6", 3 seeds): `digits-pretrained` validation 90.1 -> 90.8 (every seed), test
            89.1 -> 89.8, a half-noised image 70.6 -> 74.0 (best baseline 73.2); the noised text's gap 4.6 -> 5.2;
            feature data: validation within 0.3, `synthetic3` test 96.4 -> 95.5.
        reliability_learning_rate_scale (`float`, defaults to 1.0): the learning rate of the reliability heads
            over feature vectors and frozen (or cached) towers, as a multiple of each stage's
            (`dmil_hf.training.DmilTrainer` gives them a parameter group of their own); the heads over towers that
            train with `reliability_tower_gradient` > 0 keep the stage's rate. The heads learn only from their own
            loss, on a few corrupted rows per batch, while the representations under them move: at the stage's rate
            they were still learning when training ended (`synthetic3`: a noised `c` got reliability 0.71 on
            average, where a head fitted afterwards on the same tower outputs gave 0.25). Measured at 5
            (BENCHMARKS.md, "Round 7", 3 seeds): validation rose a little everywhere (`digits-pretrained` 90.8 ->
            91.1, `synthetic3` 96.7 -> 97.0) and `synthetic3`'s held-out blank `c` cost 4.3 points instead of 10.1,
            but on test `synthetic3` fell 95.5 -> 94.7, a feature dataset the package had not seen 88.6 -> 87.3 and
            `digits-pretrained`'s noised text gap rose 4.3 -> 6.1: not a default. Scaling the heads over trained tiny
            towers too broke the held-out silent clip on `digits` (validation gap 6.5-6.7 -> 17-28).
        reliability_refit_steps (`int`, defaults to 3000): after the last stage, train the reliability heads of
            `reliability_refit_modalities` alone for this many steps on the final model
            (`DmilForMultimodalClassification.refit_reliability`, run by `dmil_hf.training.train_staged`; AdamW at
            1e-3 on the pooled tower outputs and targets of up to 16,384 training rows, read once): during the stages
            the heads learn under representations that keep moving, and are still learning when training ends. 0
            (configs saved before this field existed): no refit. Measured in BENCHMARKS.md ("Round 8").
        reliability_refit_modalities (`list[str]`, *optional*): the modalities whose heads the refit trains; `None`:
            the feature modalities, and with `reliability_refit_corruption` set also the frozen towers
            (`freeze_towers`). Heads over towers that train are left as trained: they read representations that
            moved with them (refitted on `digits`' tiny towers they doubted clean sentences and images of templates
            the training split does not have; BENCHMARKS.md "Round 8").
        reliability_refit_corruption (`float`, *optional*, defaults to 0.5): the refit reads its own copy of the
            training split with this share of rows copied per modality and corrupted
            (`dmil_hf.data.add_training_corruption`; `dmil train` builds it with `dmil_hf.training.refit_split` and
            passes it to `train_staged` as `refit_dataset`; a split larger than the refit's 16,384 rows is sampled
            first). The stages' copy (15% per modality) shows a head few noised rows: on `digits-pretrained` the head
            over the frozen MiniLM trusted word salad of words it had not seen (BENCHMARKS.md, "Round 10"). `None` (configs saved before this field): the refit reads the training
            split as the last stage read it, and refits no tower's head by default.
        partial_corruption_weight (`float`, *optional*): the weight with which a training row whose modality is
            partly corrupted (a `modality_corruption` level strictly between 0 and 1: signal and noise mixed) trains
            the heads that read that modality (its unimodal head, its `unique_<m>` component, the synergy
            component); intact rows weigh 1, rows with a modality replaced by noise 0 (the gate learns from them, the
            components do not). The components then learn what is left of a partly noised modality, which gating
            cannot give them (BENCHMARKS.md "Round 11": the reliability forced to 1 on a partly noised modality moved
            accuracy by at most 1.6 points). A value holds for every modality. `None` (default): the model type's
            default for the towers of `freeze_towers` (`partial_corruption_weights`: 0.3 for DMIL) and 0 for feature
            vectors and towers that train. On `digits-pretrained` (3 seeds) 0.3 on the frozen text and audio towers
            raised three quarters of the audio noised from 65.1 to 67.7 on test (joint learning with the same
            corruption 67.7; validation 67.2 -> 69.6) for 0.5 points of clean validation accuracy (test 0.2;
            BENCHMARKS.md "Round 12"); on `synthetic3` 0.3 on every feature vector cost 0.6 points clean and 1
            synergy on validation and lifted no partly noised set, hence the rule by tower kind. Configs saved before
            this field: 0 everywhere.
        modality_dropout (`float`, *optional*): in training (DMIL: stages 2 and 3), the probability that a sample
            loses each modality (as if it were missing; at least one stays), so the missing-modality path is trained
            rather than only masked. `None` (default): the model type's default (`modality_dropout_probability`: 0.1
            for DMIL, 0 for the baselines, which a config converted between methods keeps).
        freeze_towers (`bool` or `list[str]`, defaults to `False`): towers that never train: `True` for every tower,
            or a list of modality names (e.g. `["text", "audio"]`). A frozen tower stays in eval mode in every stage
            (no dropout, no batch-norm updates), its parameters have `requires_grad=False` and it runs without a
            graph; its projection to `hidden_size` still trains. `dmil_hf.training` then computes its pooled
            outputs once per dataset split and feeds them as `<modality>_tower_embeds` (see
            `dmil_hf.embedding_cache`). LoRA is the middle way: `apply_lora` adapts only towers that are not frozen.

    `DmilConfig()` with no argument is valid but empty (no modality): transformers' helpers build configs that way;
    a model refuses to be built from it. An unknown keyword argument (e.g. a misspelt field) raises a `TypeError`.
    """

    model_type = "dmil"
    # Every tower is optional: a DMIL model uses any two or more of them (plus feature modalities).
    sub_configs_defaults = {
        "text_config": SubConfigSpec(AutoConfig, model_type="bert", optional=True),
        "vision_config": SubConfigSpec(AutoConfig, model_type="vit", optional=True),
        "audio_config": SubConfigSpec(AutoConfig, model_type="wav2vec2", optional=True),
    }
    # Trainer drops these from predictions (they are not tensors that can be concatenated across batches).
    keys_to_ignore_at_inference = [
        "loss_terms", "component_names", "component_logits", "component_embeds", "modality_embeds",
        "task_relevant_embeds", "task_irrelevant_embeds", "unimodal_logits", "modality_logits", "modality_mask",
    ]

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        audio_config=None,
        feature_modalities: dict[str, int] | None = None,
        hidden_size: int = 64,
        latent_size: int = 32,
        feature_hidden_size: int = 128,
        gate_hidden_size: int = 64,
        synergy_hidden_size: int | None = 256,
        tower_pooling: str = "mean",
        synergy_source: str = "towers",
        synergy_structure: str = "joint",
        synergy_gate_penalty: float = 0.1,
        synergy_subset_weight: float = 2.0,
        dropout: float = 0.1,
        frozen_tower_dropout: float | None = None,
        lamb: float = 0.2,
        kl_scale: float = 0.1,
        level1_kl_weights=(0.4, 2.0),
        level1_reconstruction_weights=(0.01, 0.05),
        stage2_reconstruction_weight: float = 0.025,
        stage2_component_weight: float = 0.5,
        stage3_unimodal_weight: float = 0.5,
        stage3_level2_scale: float = 0.4,
        stage3_component_weight: float = 0.8,
        stage3_reconstruction_weight: float = 0.01,
        stage3_level1_tower_gradient: float = 1.0,
        stage1_synergy_weight: float = 1.0,
        synergy_tower_gradient: float = 0.25,
        stage1_epochs: float = 4,
        stage2_epochs: float = 4,
        stage3_epochs: float = 16,
        stage1_learning_rate: float = 2e-3,
        stage2_learning_rate: float = 2e-3,
        stage3_learning_rate: float = 2e-3,
        training_stage: int = 3,
        check_input_values: bool | None = None,
        freeze_towers: bool | list[str] = False,
        reliability_gating: bool = True,
        reliability_marginalization: bool = True,
        reliability_loss_weight: float = 1.0,
        reliability_tower_gradient: float = 0.25,
        reliability_partial_target: str = "responsibility",
        reliability_learning_rate_scale: float = 1.0,
        reliability_refit_steps: int = 3000,
        reliability_refit_modalities: list[str] | None = None,
        reliability_refit_corruption: float | None = 0.5,
        partial_corruption_weight: float | None = None,
        modality_dropout: float | None = None,
        **kwargs,
    ):
        self._refuse_unknown_keywords(kwargs)
        self.text_config = _as_config(text_config, "text_config")
        self.vision_config = _as_config(vision_config, "vision_config")
        self.audio_config = _as_config(audio_config, "audio_config")
        for modality in TOWER_MODALITIES:
            if getattr(self, f"{modality}_config") is not None:
                _check_tower_kind(getattr(self, f"{modality}_config"), modality)
        self.feature_modalities = {str(k): int(v) for k, v in dict(feature_modalities or {}).items()}
        for name, dim in self.feature_modalities.items():
            if not name.isidentifier() or keyword.iskeyword(name) or name in RESERVED_NAMES:
                raise ValueError(
                    f"feature modality name {name!r} must be a Python identifier other than {sorted(RESERVED_NAMES)}."
                )
            if dim < 1:
                raise ValueError(f"feature modality {name!r} has input width {dim}; expected a positive integer.")
        if tower_pooling not in ("auto", "mean", "cls"):
            raise ValueError(f"`tower_pooling` is {tower_pooling!r}; expected 'auto', 'mean' or 'cls'.")
        if synergy_source not in ("all", "irrelevant", "embeddings", "towers"):
            raise ValueError(f"`synergy_source` is {synergy_source!r}; expected 'all', 'irrelevant', 'embeddings' or "
                             "'towers'.")
        if not 0.0 <= float(synergy_tower_gradient) <= 1.0:
            raise ValueError(f"`synergy_tower_gradient` is {synergy_tower_gradient}; expected a number in [0, 1].")
        self.synergy_tower_gradient = float(synergy_tower_gradient)
        if check_input_values not in (None, True, False):
            raise ValueError(f"`check_input_values` is {check_input_values!r}; expected None, True or False.")
        if training_stage not in (1, 2, 3):
            raise ValueError(f"`training_stage` is {training_stage!r}; expected 1, 2 or 3.")
        for field, value in (("hidden_size", hidden_size), ("latent_size", latent_size),
                             ("feature_hidden_size", feature_hidden_size), ("gate_hidden_size", gate_hidden_size),
                             ("synergy_hidden_size", 1 if synergy_hidden_size is None else synergy_hidden_size)):
            if int(value) < 1:
                raise ValueError(f"`{field}` is {value}; expected a positive integer.")
        self.hidden_size = int(hidden_size)
        self.latent_size = int(latent_size)
        self.feature_hidden_size = int(feature_hidden_size)
        self.gate_hidden_size = int(gate_hidden_size)
        self.synergy_hidden_size = None if synergy_hidden_size is None else int(synergy_hidden_size)
        self.tower_pooling = tower_pooling
        self.synergy_source = synergy_source
        if synergy_structure not in ("pairs", "joint"):
            raise ValueError(f"`synergy_structure` is {synergy_structure!r}; expected 'pairs' or 'joint'.")
        self.synergy_structure = synergy_structure
        self.synergy_gate_penalty = float(synergy_gate_penalty)
        if not float(synergy_subset_weight) >= 0.0:
            raise ValueError(f"`synergy_subset_weight` is {synergy_subset_weight!r}; expected a number >= 0.")
        self.synergy_subset_weight = float(synergy_subset_weight)
        for name, value in (("dropout", dropout), ("frozen_tower_dropout", frozen_tower_dropout)):
            if value is not None and not 0.0 <= float(value) < 1.0:
                raise ValueError(f"`{name}` is {value!r}; expected a probability in [0, 1).")
        self.dropout = float(dropout)
        self.frozen_tower_dropout = None if frozen_tower_dropout is None else float(frozen_tower_dropout)
        self.lamb = float(lamb)
        self.kl_scale = float(kl_scale)
        self.level1_kl_weights = level1_kl_weights if isinstance(level1_kl_weights, dict) else list(
            [level1_kl_weights] if isinstance(level1_kl_weights, (int, float)) else level1_kl_weights)
        self.level1_reconstruction_weights = (
            level1_reconstruction_weights if isinstance(level1_reconstruction_weights, dict) else list(
                [level1_reconstruction_weights] if isinstance(level1_reconstruction_weights, (int, float))
                else level1_reconstruction_weights))
        self.stage2_reconstruction_weight = float(stage2_reconstruction_weight)
        self.stage2_component_weight = float(stage2_component_weight)
        self.stage3_unimodal_weight = float(stage3_unimodal_weight)
        self.stage3_level2_scale = float(stage3_level2_scale)
        self.stage3_component_weight = float(stage3_component_weight)
        self.stage3_reconstruction_weight = float(stage3_reconstruction_weight)
        if not 0.0 <= float(stage3_level1_tower_gradient) <= 1.0:
            raise ValueError(f"`stage3_level1_tower_gradient` is {stage3_level1_tower_gradient}; expected a number in "
                             "[0, 1].")
        self.stage3_level1_tower_gradient = float(stage3_level1_tower_gradient)
        if float(stage1_synergy_weight) < 0:
            raise ValueError(f"`stage1_synergy_weight` is {stage1_synergy_weight}; expected a number >= 0.")
        self.stage1_synergy_weight = float(stage1_synergy_weight)
        self.stage1_epochs = stage1_epochs
        self.stage2_epochs = stage2_epochs
        self.stage3_epochs = stage3_epochs
        self.stage1_learning_rate = stage1_learning_rate
        self.stage2_learning_rate = stage2_learning_rate
        self.stage3_learning_rate = stage3_learning_rate
        self.training_stage = int(training_stage)
        if modality_dropout is not None and not 0.0 <= float(modality_dropout) < 1.0:
            raise ValueError(f"`modality_dropout` is {modality_dropout}; expected a probability in [0, 1) or None.")
        if float(reliability_loss_weight) < 0:
            raise ValueError(f"`reliability_loss_weight` is {reliability_loss_weight}; expected a number >= 0.")
        self.reliability_gating = bool(reliability_gating)
        self.reliability_marginalization = bool(reliability_marginalization)
        self.reliability_loss_weight = float(reliability_loss_weight)
        if not 0.0 <= float(reliability_tower_gradient) <= 1.0:
            raise ValueError(f"`reliability_tower_gradient` is {reliability_tower_gradient}; expected a number in "
                             "[0, 1].")
        self.reliability_tower_gradient = float(reliability_tower_gradient)
        if reliability_partial_target not in RELIABILITY_PARTIAL_TARGETS:
            raise ValueError(f"`reliability_partial_target` is {reliability_partial_target!r}; expected one of "
                             f"{list(RELIABILITY_PARTIAL_TARGETS)}.")
        self.reliability_partial_target = reliability_partial_target
        if not float(reliability_learning_rate_scale) > 0:
            raise ValueError(f"`reliability_learning_rate_scale` is {reliability_learning_rate_scale}; expected a "
                             "number > 0.")
        self.reliability_learning_rate_scale = float(reliability_learning_rate_scale)
        if isinstance(reliability_refit_steps, bool) or int(reliability_refit_steps) != reliability_refit_steps or \
                reliability_refit_steps < 0:
            raise ValueError(f"`reliability_refit_steps` is {reliability_refit_steps!r}; expected a whole number >= 0.")
        self.reliability_refit_steps = int(reliability_refit_steps)
        if reliability_refit_modalities is not None and (
                isinstance(reliability_refit_modalities, str)
                or not all(isinstance(m, str) for m in reliability_refit_modalities)):
            raise TypeError(f"`reliability_refit_modalities` is {reliability_refit_modalities!r}; expected None or a "
                            "list of modality names.")
        self.reliability_refit_modalities = (None if reliability_refit_modalities is None
                                             else list(reliability_refit_modalities))
        if reliability_refit_corruption is not None and (isinstance(reliability_refit_corruption, bool)
                                                         or not 0.0 < float(reliability_refit_corruption) <= 1.0):
            raise ValueError(f"`reliability_refit_corruption` is {reliability_refit_corruption!r}; expected None or a "
                             "share of rows in (0, 1].")
        self.reliability_refit_corruption = (None if reliability_refit_corruption is None
                                             else float(reliability_refit_corruption))
        if partial_corruption_weight is not None and (isinstance(partial_corruption_weight, bool)
                                                      or not 0.0 <= float(partial_corruption_weight) <= 1.0):
            raise ValueError(f"`partial_corruption_weight` is {partial_corruption_weight!r}; expected None or a "
                             "weight in [0, 1].")
        self.partial_corruption_weight = (None if partial_corruption_weight is None
                                          else float(partial_corruption_weight))
        self.modality_dropout = None if modality_dropout is None else float(modality_dropout)
        self.check_input_values = check_input_values
        if not isinstance(freeze_towers, (bool, str, list, tuple, set, frozenset)):
            raise TypeError(f"`freeze_towers` is {freeze_towers!r}; expected True, False or a list of modality names.")
        self.freeze_towers = freeze_towers if isinstance(freeze_towers, (bool, str)) else list(freeze_towers)
        if "attn_implementation" not in kwargs:
            # PretrainedConfig sets `attn_implementation` (None when not given) on every sub-config. A tower built
            # with from_pretrained shares its config with us, so None would replace its "sdpa", and transformers
            # builds no attention mask for None: until the model was saved and reloaded, the tower attended to
            # padding (training and the run's own test report, but not `dmil evaluate`). A dict keeps the towers'.
            kwargs["attn_implementation"] = {"": None}
        super().__init__(**kwargs)
        # No modality at all is the valid-but-empty default (`DmilConfig()`, as every transformers composite config
        # allows); a model refuses to be built from it (`validate_for_model`). One modality is a mistake.
        if len(self.modalities) == 1:
            raise ValueError(self._modalities_message())
        if self.num_labels is None or self.num_labels < 1:
            raise ValueError(f"`num_labels` is {self.num_labels!r}; expected a positive integer (1 for regression).")
        self._check_freeze_towers()
        unknown = sorted(set(self.reliability_refit_modalities or ()) - set(self.modalities))
        if unknown:
            raise ValueError(f"`reliability_refit_modalities` names unknown modalities {unknown}; this config's "
                             f"modalities are {list(self.modalities)}.")

    def refit_modalities(self) -> list[str]:
        """The modalities whose reliability heads `reliability_refit_steps` refits (see
        `reliability_refit_modalities`), in `modalities` order."""
        chosen = self.reliability_refit_modalities
        if chosen is None:
            frozen = self.frozen_modalities if self.reliability_refit_corruption is not None else ()
            return [m for m in self.modalities if m in self.feature_modalities or m in frozen]
        return [m for m in self.modalities if m in chosen]

    def _check_freeze_towers(self) -> None:
        value = self.freeze_towers
        if isinstance(value, bool):
            return
        if isinstance(value, str) or not all(isinstance(m, str) for m in value):
            raise TypeError(f"`freeze_towers` is {value!r}; expected True, False or a list of modality names "
                            f"(e.g. {[value] if isinstance(value, str) else list(self.modalities)[:1]}).")
        unknown = sorted(set(value) - set(self.modalities))
        if unknown:
            raise ValueError(f"`freeze_towers` names unknown modalities {unknown}; this config's modalities are "
                             f"{list(self.modalities)}.")

    @property
    def frozen_modalities(self) -> tuple[str, ...]:
        """The modalities whose towers `freeze_towers` freezes, in `modalities` order."""
        value = self.freeze_towers
        if isinstance(value, bool):
            return self.modalities if value else ()
        return tuple(m for m in self.modalities if m in value)

    @property
    def frozen_tower_modalities(self) -> tuple[str, ...]:
        """The frozen modalities that have a tower (a feature vector marked frozen has none): those the frozen towers'
        defaults (`frozen_tower_dropout`, `partial_corruption_weight`) act on."""
        return tuple(m for m in self.frozen_modalities if self.tower_config(m) is not None)

    def _modalities_message(self) -> str:
        return (
            f"DMIL needs at least two modalities; got {list(self.modalities) or 'none'}. Give two or more of "
            "text_config, vision_config, audio_config and feature_modalities."
        )

    def validate_for_model(self) -> None:
        """Raise if a model cannot be built from this config (e.g. a default-constructed, empty `DmilConfig()`)."""
        if len(self.modalities) < 2:
            empty = " (an empty config, e.g. `DmilConfig()` or a folder without config.json)" if not self.modalities else ""
            raise ValueError(self._modalities_message() + f" This config has {len(self.modalities)}{empty}.")
        if self.num_labels is None or self.num_labels < 1:
            raise ValueError(f"`num_labels` is {self.num_labels!r}; expected a positive integer (1 for regression).")

    def _refuse_unknown_keywords(self, kwargs) -> None:
        """A misspelt field would otherwise be stored as an extra attribute and have no effect."""
        if _FROM_SAVED_DICT.get():
            return
        # Fields of the whole DMIL config family count as known: a baseline's own field (e.g. `i2moe_temperature`)
        # given to a plain DmilConfig is carried to the baseline's config by `build_model`.
        family, stack = [], [DmilConfig]
        while stack:
            klass = stack.pop()
            family.append(klass)
            stack += klass.__subclasses__()
        known = {name for klass in family for name in klass._init_parameters()}
        unknown = sorted(k for k in kwargs if k not in _STANDARD_CONFIG_KEYS and k not in known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
            raise TypeError(
                f"{type(self).__name__} got unknown keyword argument(s) {', '.join(hints)}. Its fields are "
                f"{sorted(known)}, plus the standard PretrainedConfig ones (num_labels, id2label, problem_type, ...)."
            )

    @classmethod
    def _init_parameters(cls) -> list[str]:
        names = []
        for klass in cls.__mro__:
            if klass is PretrainedConfig or not issubclass(klass, PretrainedConfig):
                break
            if "__init__" in klass.__dict__:
                names += [n for n, p in inspect.signature(klass.__dict__["__init__"]).parameters.items()
                          if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        return names

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """As [`PretrainedConfig.from_dict`]; extra keys of a saved config (attributes set before saving) are kept, and
        a config saved before a field's default changed keeps the behaviour it was saved with (`_DEFAULTS_BEFORE`)."""
        before = {k: v(config_dict) if callable(v) else v for k, v in _DEFAULTS_BEFORE.items()}
        config_dict = {**before, **config_dict}
        token = _FROM_SAVED_DICT.set(True)
        try:
            return super().from_dict(config_dict, **kwargs)
        finally:
            _FROM_SAVED_DICT.reset(token)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in canonical order: text, vision, audio, then the feature modalities sorted by name
        (sorted because the saved JSON sorts its keys: the order must survive a save/load round trip)."""
        # Read from the instance dict in one lookup: the models read this on every forward, and each attribute read
        # of a transformers config passes through its (slow) `__getattribute__`.
        fields = vars(self)
        towers = tuple(m for m in TOWER_MODALITIES if fields.get(f"{m}_config") is not None)
        return towers + tuple(sorted(fields.get("feature_modalities") or ()))

    @property
    def modality_dropout_probability(self) -> float:
        """`modality_dropout`, or where it is None the default of this model type (0.1 for DMIL, 0 otherwise)."""
        if self.modality_dropout is not None:
            return self.modality_dropout
        return DEFAULT_MODALITY_DROPOUT.get(self.model_type, 0.0)

    @property
    def frozen_tower_dropout_probability(self) -> float:
        """`frozen_tower_dropout`, or where it is None the default of this model type (0.5 for DMIL, `dropout`
        otherwise)."""
        if self.frozen_tower_dropout is not None:
            return self.frozen_tower_dropout
        return DEFAULT_FROZEN_TOWER_DROPOUT.get(self.model_type, self.dropout)

    def dropout_probabilities(self) -> dict[str, float]:
        """The dropout on each modality's projected embedding: `frozen_tower_dropout_probability` for the frozen
        towers, `dropout` for the others."""
        frozen = self.frozen_tower_modalities
        return {m: self.frozen_tower_dropout_probability if m in frozen else self.dropout for m in self.modalities}

    def partial_corruption_weights(self) -> dict[str, float]:
        """The weight of a partly corrupted training row in the losses of the heads that read each modality:
        `partial_corruption_weight` for every modality where it is set, else the model type's default for the frozen
        towers (0.3 for DMIL) and 0 for the other modalities."""
        if self.partial_corruption_weight is not None:
            return {m: self.partial_corruption_weight for m in self.modalities}
        frozen = self.frozen_tower_modalities
        weight = DEFAULT_FROZEN_TOWER_PARTIAL_WEIGHT.get(self.model_type, 0.0)
        return {m: weight if m in frozen else 0.0 for m in self.modalities}

    @property
    def component_names(self) -> tuple[str, ...]:
        """Names of the decomposed components, in the order of `component_logits` and `interaction_weights`."""
        return ("redundancy",) + tuple(f"unique_{m}" for m in self.modalities) + ("synergy",)

    def tower_config(self, modality: str) -> PretrainedConfig | None:
        return getattr(self, f"{modality}_config", None) if modality in TOWER_MODALITIES else None

    def modality_weights(self, field: str) -> dict[str, float]:
        return _per_modality(getattr(self, field), self.modalities, field)

    @property
    def stages(self) -> tuple["DmilStage", ...]:
        """The three stages of the schedule with their presets (`stage<k>_epochs`, `stage<k>_learning_rate`)."""
        return tuple(DmilStage(k, getattr(self, f"stage{k}_epochs"), getattr(self, f"stage{k}_learning_rate"))
                     for k in (1, 2, 3))

    @property
    def scheduled_stages(self) -> tuple["DmilStage", ...]:
        """The stages `dmil_hf.training` runs: those with epochs > 0 (0 skips a stage)."""
        return tuple(stage for stage in self.stages if stage.epochs > 0)


@dataclasses.dataclass(frozen=True)
class DmilStage:
    """One stage of DMIL's schedule: its number (1-3), epochs and learning rate. What it trains and its loss are
    defined with the model (`DmilForMultimodalClassification.stage_parameter_groups`, `STAGE_LOSSES`)."""

    index: int
    epochs: float
    learning_rate: float

    @property
    def name(self) -> str:
        return f"stage{self.index}"


__all__ = ["CORRUPTION_INPUT", "DmilConfig", "DmilStage", "TOWERS", "TOWER_INPUTS", "TOWER_MODALITIES", "TowerModality", "column_of"]
