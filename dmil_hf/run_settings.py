"""The settings of one training run, defined once: [`RunSettings`] is what `run_training` takes, and `dmil train`'s
options are generated from its fields (help, defaults, choices) by [`RunSettingsParser`], a
`transformers.HfArgumentParser`.

Most fields are one option each (`batch_size` -> `--batch-size`, also spelled `--batch_size`; a bool field is a flag
that also takes a value, `--lora` or `--lora false`). The few that are not one plain value on the command line say in
their metadata how they are spelled there (`"options"`: option string -> argparse keywords) and how what those parsed
becomes the field (`"from_args"`); [`settings_from_args`] applies it. `run_checks.check_settings` is the boundary that
refuses values that cannot be right, whichever way the settings were made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

from .configuration_dmil import TOWER_MODALITIES
from .methods import METHODS


def parse_key_values(pairs, option: str = "--dataset-arg") -> dict:
    """`["k=1", "name=x"]` -> `{"k": 1, "name": "x"}`: values are read as JSON, and kept as text where they are not."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} {pair!r} must look like KEY=VALUE.")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def _key_values(option: str, help: str) -> dict:
    """Metadata of a dict field given as repeated `option KEY=VALUE`."""
    return {"help": help, "options": {option: dict(action="append", default=[], metavar="KEY=VALUE", help=help)},
            "from_args": lambda args: parse_key_values(getattr(args, _dest(option)), option)}


def _three_stages(option: str, help: str) -> dict:
    """Metadata of a per-stage field given as `option S1 S2 S3`."""
    return {"help": help, "options": {option: dict(type=float, nargs=3, metavar=("S1", "S2", "S3"), help=help)},
            "from_args": lambda args: tuple(getattr(args, _dest(option))) if getattr(args, _dest(option)) else None}


def _pretrained_from_args(args) -> dict:
    return {m: getattr(args, f"{m}_model") for m in TOWER_MODALITIES if getattr(args, f"{m}_model")}


_PRETRAINED_HELP = ("pretrained {modality} tower: hub id or local folder (replaces the random one); offline aliases "
                    "from the 'pretrained' extra: all-minilm-l6-v2 (text), whisper-tiny.en (audio)")
_OUTPUT_DIR_HELP = "folder of the run: final model, metrics.json, train_log.jsonl (and checkpoints while it trains)"
_FREEZE_HELP = ("freeze these towers (no modality named: every tower): eval mode, no gradient, their pooled outputs "
                "computed once per split and cached; their projections still train")


@dataclass
class RunSettings:
    """Everything `dmil train` needs. Epoch and learning-rate fields left as None take the method's defaults."""

    dataset: str = field(default="digits", metadata={
        "help": "built-in name (synthetic, digits) or a save_to_disk folder"})
    method: Literal[tuple(METHODS)] = field(default="dmil", metadata={"help": "DMIL or a baseline"})
    output_dir: str = field(default="runs/dmil-digits", metadata={
        "help": _OUTPUT_DIR_HELP, "options": {"--output-dir": dict(required=True, help=_OUTPUT_DIR_HELP)}})
    towers: Literal["tiny", "small"] = field(default="tiny", metadata={"help": "size of randomly initialised towers"})
    pretrained: dict = field(default_factory=dict, metadata={
        "help": "modality -> hub id or local folder of a pretrained tower", "from_args": _pretrained_from_args,
        "options": {f"--{modality}-model": dict(default=None, help=_PRETRAINED_HELP.format(modality=modality))
                    for modality in TOWER_MODALITIES}})
    stage_epochs: tuple | None = field(default=None, metadata=_three_stages(
        "--stage-epochs", "DMIL epochs per stage (None: the config's presets; 0 skips a stage)"))
    stage_learning_rates: tuple | None = field(default=None, metadata=_three_stages(
        "--stage-learning-rates", "DMIL learning rate per stage (None: the config's presets)"))
    epochs: float | None = field(default=None, metadata={"help": "baselines: epochs (None: DMIL's total)"})
    learning_rate: float | None = field(default=None, metadata={"help": "baselines: learning rate (None: 2e-3)"})
    batch_size: int = field(default=64, metadata={"help": "per-device batch size"})
    seed: int = field(default=0, metadata={
        "help": "seeds model init, data order and dropout: on CPU the same seed, settings and thread count give "
                "identical weights"})
    lora: bool = field(default=False, metadata={
        "help": "LoRA on the transformer towers that are not frozen; the head trains fully"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run in --output-dir"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing run in --output-dir (only a folder dmil wrote; checked before deleting)"})
    report_to: str = field(default="none", metadata={
        "help": "passed to Trainer: none, tensorboard, ... (they get every loss term)"})
    dataset_kwargs: dict = field(default_factory=dict, metadata=_key_values(
        "--dataset-arg", "argument for a built-in dataset builder, e.g. num_samples=600 (JSON values)"))
    config_overrides: dict = field(default_factory=dict, metadata=_key_values(
        "--config-arg", "override a DmilConfig field, e.g. latent_size=64 or synergy_source=irrelevant (JSON values)"))
    tower_pooling: Literal["auto", "mean", "cls"] = field(default="mean", metadata={
        "help": "how tower outputs are pooled", "aliases": ["--pooling"]})
    push_to_hub: bool = field(default=False, metadata={
        "help": "push the finished model (exported with remote code and card) to --hub-model-id"})
    hub_model_id: str | None = field(default=None, metadata={"help": "user/name or org/name on the Hub"})
    hub_private: bool = field(default=False, metadata={"help": "create the Hub repo private"})
    resume_with_changes: bool = field(default=False, metadata={
        "help": "with --resume: continue even though settings or data differ from the interrupted run's"})
    full_determinism: bool = field(default=False, metadata={
        "help": "transformers' enable_full_determinism: torch deterministic algorithms (slower on GPU)"})
    freeze_towers: bool | list = field(default=False, metadata={
        "help": "DmilConfig.freeze_towers: True (all towers) or modality names",
        "options": {"--freeze-towers": dict(nargs="*", metavar="MODALITY", default=None, help=_FREEZE_HELP)},
        "from_args": lambda args: False if args.freeze_towers is None else (list(args.freeze_towers) or True)})
    train_corruption: float | None = field(default=None, metadata={
        "help": "share of training rows copied with each modality corrupted (noise, or noise mixed in), so the model "
                "learns to tell a broken modality from a working one (None: the method's default, 0.15 for dmil, 0 "
                "for the baselines; 0: clean rows only)"})
    modality_dropout: float | None = field(default=None, metadata={
        "help": "probability that a training sample loses each modality, as if missing (DmilConfig.modality_dropout; "
                "None: the config's default, 0.1 for dmil in stages 2-3, 0 for the baselines)"})
    torch_compile: bool = field(default=False, metadata={
        "help": "compile the model with torch.compile (TrainingArguments.torch_compile, inductor): the first "
                "training and evaluation steps compile their graphs (minutes for DMIL on a CPU, seconds once "
                "inductor's cache holds them), later steps run faster. It pays only where the time saved per step "
                "over the run outweighs that: `dmil profile --train-step --compile` measures both (BENCHMARKS.md, "
                "'Step cost')"})
    embedding_cache: bool = field(default=True, metadata={
        "help": "cache the pooled outputs of frozen towers (dmil_hf.embedding_cache); False: run them live",
        "options": {"--no-embedding-cache": dict(action="store_false", dest="embedding_cache", help=(
            "run frozen towers live in every epoch instead of caching their outputs (same result, slower)"))}})


class RunSettingsParser(HfArgumentParser):
    """`HfArgumentParser` over [`RunSettings`]; a field with `"options"` metadata gets those options instead.

    As the parser of a subcommand: `subparsers.add_parser("train", parents=[RunSettingsParser(add_help=False)])`."""

    def __init__(self, **kwargs):
        super().__init__(RunSettings, **kwargs)

    @staticmethod
    def _parse_dataclass_field(parser, field):
        if "options" not in field.metadata:
            return HfArgumentParser._parse_dataclass_field(parser, field)
        for option, kwargs in field.metadata["options"].items():
            parser.add_argument(option, **kwargs)


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The [`RunSettings`] that `args`, parsed with [`RunSettingsParser`]'s options, describe."""
    values = {}
    for f in dataclasses.fields(RunSettings):
        convert = f.metadata.get("from_args")
        values[f.name] = convert(args) if convert else getattr(args, f.name)
    return RunSettings(**values)


def add_dataset_arg_option(parser: argparse.ArgumentParser) -> None:
    """`--dataset-arg KEY=VALUE` on `parser` as `dmil train` has it (from `RunSettings.dataset_kwargs`), for the other
    subcommands that build a dataset; read it with `parse_key_values(args.dataset_arg)`."""
    (dataset_kwargs,) = (f for f in dataclasses.fields(RunSettings) if f.name == "dataset_kwargs")
    for option, kwargs in dataset_kwargs.metadata["options"].items():
        parser.add_argument(option, **kwargs)


__all__ = ["RunSettings", "RunSettingsParser", "add_dataset_arg_option", "parse_key_values", "settings_from_args"]
