"""DMIL's three-stage schedule on top of `transformers.Trainer`, LoRA on the towers, and resumable runs.

One `Trainer` per stage: each stage gets its own optimizer and learning rate, evaluates every epoch on the
validation split, and ends by restoring its best checkpoint (`load_best_model_at_end`), which is also where the next
stage starts. A finished stage leaves `stage<k>/best/` and `stage<k>/done.json`, so `resume=True` skips finished
stages and continues the interrupted one from its last checkpoint with Trainer's own resume.

Frozen towers run once, not once per epoch: before each stage, the pooled outputs of the towers that stay fixed in it
(those of `config.freeze_towers` in every stage, and every tower in stage 2, where the schedule freezes them) are
read from the embedding cache or computed once (`dmil_hf.embedding_cache`), and the stage trains and evaluates on
them; the towers that train run live.

Logging: every loss term reaches the `report_to` integrations and the callbacks (e.g. [`TrainLogCallback`], which
appends them to a JSON-lines file); the console gets one short line per log event ([`log_line`]).

Example (your own script):
```python
from transformers import TrainingArguments
from dmil_hf.training import train_staged

args = TrainingArguments("runs/my-dmil", per_device_train_batch_size=32, remove_unused_columns=False)
train_staged(model, args, train_dataset, eval_dataset, compute_metrics=compute_metrics)
```
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .configuration_dmil import CORRUPTION_INPUT
from .methods import method_of
from .modeling_dmil import stacked_terms

logger = logging.getLogger(__name__)

# Attention projections LoRA adapts, by the names each family uses (transformers 5); the first pair present wins.
LORA_TARGET_CANDIDATES = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("qkv",))


def log_line(stage: str, state, logs: dict) -> str:
    """The console line of one log event: a training window's step, loss and main loss terms (`task`: the gated or
    the baseline's task loss; `kl`, `rec`: the sums of the KL and reconstruction terms), an evaluation's validation
    metrics, or a finished stage's time."""
    if "train_runtime" in logs:
        return f"{stage}: done in {logs['train_runtime']:.1f} s, mean loss {logs.get('train_loss', float('nan')):.4g}"
    epoch = f"epoch {logs.get('epoch', state.epoch or 0):.2f}"
    if any(key.startswith("eval_") for key in logs):
        shown = [f"{name} {logs[f'eval_{name}']:.4f}" for name in ("accuracy", "mse") if f"eval_{name}" in logs]
        return f"{stage} {epoch}: validation " + ", ".join(shown + [f"loss {logs.get('eval_loss', float('nan')):.4g}"])
    terms = {key[len("loss_"):]: value for key, value in logs.items() if key.startswith("loss_")}
    shown = {"loss": logs["loss"]} if "loss" in logs else {}
    task = terms.get("task_gated", terms.get("task"))
    if task is not None:
        shown["task"] = task
    for group, prefix in (("kl", "kl_"), ("rec", "reconstruction_")):
        values = [value for name, value in terms.items() if name.startswith(prefix)]
        if values:
            shown[group] = sum(values)
    return (f"{stage} step {state.global_step}/{state.max_steps} {epoch}: "
            + ", ".join(f"{name} {value:.4g}" for name, value in shown.items()))


class ConsoleProgressCallback(ProgressCallback):
    """Trainer's progress bar, with one short [`log_line`] per log event instead of the dict of every logged value."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(log_line(Path(args.output_dir).name, state, logs))


class ConsolePrinterCallback(TrainerCallback):
    """[`ConsoleProgressCallback`]'s lines without the bar (`disable_tqdm=True`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            print(log_line(Path(args.output_dir).name, state, logs))


class TrainLogCallback(TrainerCallback):
    """Appends every log event, with all its values (every loss term), to the JSON-lines file `path`: one object per
    event, `{"stage": ..., "step": ..., **logs}`, from the main process only. A resumed run appends to the same file
    (the steps between the last checkpoint and the interruption then appear twice)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"stage": Path(args.output_dir).name, "step": state.global_step, **logs}
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits (registered once; a no-op where none is left).

    `Trainer` never destroys the group that `accelerate launch` makes it create, and a process that exits with a live
    gloo group can abort in interpreter finalisation ("terminate called without an active exception", SIGABRT), seen
    once on a two-process CPU run whose training had finished. An `atexit` handler runs while Python is still whole."""

    def destroy():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


class DmilTrainer(Trainer):
    """`Trainer` that logs every loss term of DMIL (and the baselines) by name, averaged over the logging window.

    The terms are summed on the model's device, one stacked tensor per step, and read back once per logging window:
    reading each term every step (`float(term)`) would make the host wait for the device once per term per step.
    Every term goes to the logging integrations (`report_to`) and callbacks; the console gets a short line per log
    event ([`log_line`]) instead of Trainer's dict of them all."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            destroy_process_group_at_exit()
        if self.pop_callback(PrinterCallback) is not None:
            self.add_callback(ConsolePrinterCallback)
        elif self.pop_callback(ProgressCallback) is not None:
            self.add_callback(ConsoleProgressCallback)
        self._term_sums: dict[str, float] = {}  # windows already read back (the term names changed within one)
        self._term_names: tuple[str, ...] = ()
        self._term_total = None  # running sum of the current names' values, on the device
        self._term_steps = 0
        self._parameter_count = None

    def _flush_terms(self):
        if self._term_total is not None:
            for name, value in zip(self._term_names, self._term_total.tolist()):
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value
        self._term_total = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        terms = getattr(outputs, "loss_terms", None)
        if model.training and terms:
            names = tuple(terms)
            if names != self._term_names:
                self._flush_terms()
                self._term_names = names
            with torch.no_grad():  # DMIL's terms are cut from a few vectors: read those, not each term
                values = stacked_terms(terms).detach().float()
                self._term_total = values if self._term_total is None else self._term_total + values
            self._term_steps += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the parameters the model names in `learning_rate_scales()` (e.g. DMIL's
        reliability heads) moved to groups of their own whose learning rate is that multiple of the stage's (the
        scheduler, created afterwards, schedules every group alike; weight decay stays as Trainer chose it)."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        scales = getattr(self.model, "learning_rate_scales", None)
        if not fresh or not callable(scales):
            return optimizer
        for parameters, scale in scales():
            chosen = {id(p) for p in parameters}
            for group in list(optimizer.param_groups):
                moved = [p for p in group["params"] if id(p) in chosen]
                if moved and len(moved) < len(group["params"]):
                    group["params"] = [p for p in group["params"] if id(p) not in chosen]
                    optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                               "params": moved, "lr": group["lr"] * scale})
                elif moved:  # the whole group: scale it where it is
                    group["lr"] *= scale
        return optimizer

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate for `total_flos` (6 × the main input's elements × the parameters), with the parameters
        counted once per training run: Trainer's own counts them at every step, walking every module and parameter."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameter_count

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._term_steps:
            self._flush_terms()
            logs.update({f"loss_{k}": round(v / self._term_steps, 5) for k, v in self._term_sums.items()})
            self._term_sums, self._term_steps = {}, 0
        super().log(logs, *args, **kwargs)


def stage_plan(model: PreTrainedModel, args: TrainingArguments) -> list[dict]:
    """The stages to run: a staged method's (DMIL's three, epochs and learning rates from its config's
    `scheduled_stages`), or one for other models."""
    method = method_of(model)
    if method is None or not method.staged:
        return [{"stage": None, "name": "train", "epochs": args.num_train_epochs, "learning_rate": args.learning_rate}]
    return [{"stage": s.index, "name": s.name, "epochs": s.epochs, "learning_rate": s.learning_rate}
            for s in model.config.scheduled_stages]


def _stage_arguments(args: TrainingArguments, stage: dict, model, greater_is_better: bool, metric: str):
    overrides = dict(
        output_dir=str(Path(args.output_dir) / stage["name"]),
        num_train_epochs=stage["epochs"],
        learning_rate=stage["learning_rate"],
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=greater_is_better,
        save_total_limit=2,
        remove_unused_columns=False,
        logging_dir=None,
        push_to_hub=False,  # stages never push their checkpoints; the finished model is pushed once, exported
        # Pinned memory only speeds up copies to an accelerator; without one, torch's DataLoader warns at every
        # train and eval loop that it is unused.
        dataloader_pin_memory=args.dataloader_pin_memory and args.device.type != "cpu",
    )
    method = method_of(model)
    if method is not None and method.max_grad_norm is not None:  # e.g. the ensemble: no joint clipping
        overrides["max_grad_norm"] = method.max_grad_norm
    fields = {f.name for f in dataclasses.fields(args)}
    return dataclasses.replace(args, **{k: v for k, v in overrides.items() if k in fields})


def cached_stage_splits(model, args: TrainingArguments, stage: dict, train_dataset, eval_dataset,
                        embedding_cache=True) -> tuple:
    """`(train_dataset, eval_dataset, records)` for `stage`, with the towers that stay fixed in it replaced by their
    cached pooled outputs (see the module docstring). `args` are the stage's own arguments (`output_dir` is the
    stage's folder). `embedding_cache`: True for the default cache folder
    (`$DMIL_HF_CACHE/embeddings`) for `config.freeze_towers`, a folder, or False to run every tower live. Towers that
    only stage 2 freezes change between runs, so their arrays go to the stage's own folder (`<output_dir>/stage2/
    embeddings`), which a finished `dmil train` run deletes with its checkpoints."""
    from .embedding_cache import cache_tower_embeddings, default_cache_dir

    encoders = getattr(getattr(model, "base_model", model), "encoders", None)
    if not embedding_cache or encoders is None:
        return train_dataset, eval_dataset, []
    frozen = list(encoders.frozen_modalities)
    by_schedule = [m for m in encoders.modalities if m not in frozen] if stage["stage"] == 2 else []
    splits = {"train": train_dataset}
    named_evals = isinstance(eval_dataset, dict)
    for name, split in (eval_dataset.items() if named_evals else [("validation", eval_dataset)]):
        splits[f"eval:{name}" if named_evals else name] = split
    records = []
    show = not args.disable_tqdm
    for modalities, folder in ((frozen, default_cache_dir() if embedding_cache is True else Path(embedding_cache)),
                               (by_schedule, Path(args.output_dir) / "embeddings")):
        if modalities:
            splits, new = cache_tower_embeddings(model, splits, modalities, folder, device=args.device,
                                                 batch_size=args.per_device_eval_batch_size, show_progress=show)
            records += new
    if named_evals:
        evals = {name[len("eval:"):]: split for name, split in splits.items() if name.startswith("eval:")}
    else:
        evals = splits["validation"]
    return splits["train"], evals, records


def batched_splits(train_dataset, eval_dataset) -> tuple:
    """`(train_dataset, eval_dataset, data_collator)` with every split that can be read a batch at a time as
    [`dmil_hf.column_batches.ColumnBatches`] (`eval_dataset` may be a dict of named splits), and the collator that
    takes both kinds; the batches are those of the rows and `default_data_collator`."""
    from .column_batches import collate_batches, column_batches

    if isinstance(eval_dataset, dict):
        eval_dataset = {name: column_batches(split) for name, split in eval_dataset.items()}
    elif eval_dataset is not None:
        eval_dataset = column_batches(eval_dataset)
    return column_batches(train_dataset), eval_dataset, collate_batches


def load_checkpoint_weights(model: torch.nn.Module, folder) -> None:
    """Load `folder/model.safetensors` into `model` key for key (`safetensors.torch.load_model`, strict: a missing or
    unexpected weight is an error that names the checkpoint)."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(folder)!r} holds no model.safetensors to restore.")
    try:
        load_model(model, str(path), strict=True)
    except RuntimeError as error:
        raise RuntimeError(f"checkpoint {str(path)!r} does not match the model: {error}") from None


def checkpoint_problem(folder) -> str | None:
    """Why the Trainer checkpoint `folder` cannot be resumed from (a file missing, truncated or unreadable, as a kill
    during the save leaves it), or None when every file it needs reads back."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as err:
        return f"{state} is missing or unreadable ({type(err).__name__})"
    weights = folder / "model.safetensors"
    try:
        load_file(str(weights))
    except Exception as err:  # SafetensorError, OSError: a truncated or absent file
        return f"{weights} is missing or truncated ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    for name in ("optimizer.pt", "scheduler.pt"):
        path = folder / name
        if not path.exists():
            continue
        try:
            torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated zip archive
            return f"{path} is truncated or unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def last_complete_checkpoint(stage_dir) -> str | None:
    """The newest `checkpoint-<step>` in `stage_dir` that reads back completely; a newer broken one (a kill during its
    save) is skipped with a warning naming the broken file. None when the stage has no checkpoint yet; if every
    checkpoint is broken, a ValueError names them (delete them to restart the stage)."""
    stage_dir = Path(stage_dir)
    pattern = re.compile(r"^checkpoint-(\d+)$")
    found = sorted((int(m.group(1)), p) for p in stage_dir.iterdir() if p.is_dir() and (m := pattern.match(p.name)))
    problems = []
    for _, folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            for broken in problems:
                logger.warning("Resume: skipping a broken checkpoint: %s; continuing from %s instead.", broken, folder)
            return str(folder)
        problems.append(problem)
    if problems:
        raise ValueError(f"--resume: no checkpoint in {str(stage_dir)!r} reads back completely: {'; '.join(problems)}. "
                         f"Delete {str(stage_dir)!r} to restart that stage from the previous stage's best model.")
    return None


def train_staged(model, args: TrainingArguments, train_dataset, eval_dataset, compute_metrics=None,
                 data_collator=None, resume: bool = False, callbacks=None, metric: str = "accuracy",
                 greater_is_better: bool = True, processor=None, embedding_cache=True,
                 refit_dataset=None) -> list[dict]:
    """
    Train `model` stage by stage (DMIL) or in one run (baselines), restoring the best validation checkpoint at the end
    of every stage. Returns one record per stage (`stage`, `best_metric`, `best_checkpoint`, `train_seconds`).

    Args:
        model: a `DmilForMultimodalClassification` (three stages) or any classifier (one stage).
        args: the `TrainingArguments`; `output_dir` gets one sub-folder per stage; epochs and learning rates come
            from the model config's stage presets (DMIL) or from `args` (others).
        resume: continue an interrupted run from `args.output_dir` (finished stages are reloaded, not re-run).
        metric / greater_is_better: the validation metric (from `compute_metrics`) that picks each stage's best.
        processor: saved beside the final model when `args.push_to_hub` is set.
        embedding_cache: where the pooled outputs of frozen towers are cached (see [`cached_stage_splits`]): True
            (default folder), a folder, or False (every tower runs live in every epoch; the same result).
        refit_dataset: what the reliability refit after the last stage reads (`DmilConfig.reliability_refit_steps`):
            the training split with its own corrupted copies, encoded like `train_dataset` ([`refit_split`] builds
            it from the raw split); `None`: `train_dataset`.

    With `args.push_to_hub=True` (and `args.hub_model_id`), the finished model is saved to `args.output_dir/final` and
    pushed with [`dmil_hf.hub.push_model`]: exported with its remote code and model card, reloaded in a fresh process
    and checked, then uploaded as one commit (`hub_private_repo`, `hub_revision` and `hub_token` are honoured).
    """
    if args.push_to_hub:
        from .hub import check_push_target

        check_push_target(args.hub_model_id, args.hub_token, revision=args.hub_revision)
    records = []
    for stage in stage_plan(model, args):
        stage_dir = Path(args.output_dir) / stage["name"]
        done = stage_dir / "done.json"
        if stage["stage"] is not None:
            model.set_training_stage(stage["stage"])
        if resume and done.exists():
            load_checkpoint_weights(model, stage_dir / "best")
            records.append(json.loads(done.read_text()))
            logger.info("Resume: %s already finished; reloaded its best checkpoint.", stage["name"])
            continue
        stage_args = _stage_arguments(args, stage, model, greater_is_better, f"eval_{metric}")
        # accelerate marks what it prepared so as never to wrap it twice. Under torch.compile the mark lands on the
        # model itself (the compiled wrapper passes attribute writes through), and every later stage's Trainer then
        # left the model uncompiled: each stage prepares it afresh.
        vars(model).pop("_is_accelerate_prepared", None)
        stage_train, stage_eval, cached = cached_stage_splits(model, stage_args, stage, train_dataset, eval_dataset,
                                                              embedding_cache)
        collator = data_collator
        if data_collator is None:  # numeric splits are read a batch at a time (see dmil_hf.column_batches)
            stage_train, stage_eval, collator = batched_splits(stage_train, stage_eval)
        trainer = DmilTrainer(model=model, args=stage_args, train_dataset=stage_train, eval_dataset=stage_eval,
                              compute_metrics=compute_metrics, data_collator=collator, callbacks=callbacks)
        last = last_complete_checkpoint(stage_dir) if resume and stage_dir.exists() else None
        output = trainer.train(resume_from_checkpoint=last)
        record = {
            "stage": stage["name"],
            "best_metric": trainer.state.best_metric,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "train_seconds": output.metrics.get("train_runtime"),
            "epochs": stage["epochs"],
            "learning_rate": stage["learning_rate"],
            "embedding_cache": [{k: r[k] for k in ("split", "modality", "hit")} for r in cached],
        }
        if trainer.state.best_model_checkpoint:
            # Trainer reloads the best checkpoint non-strictly; check that every weight really came back.
            load_checkpoint_weights(model, trainer.state.best_model_checkpoint)
        trainer.save_model(str(stage_dir / "best"))
        if trainer.is_world_process_zero():
            done.write_text(json.dumps(record, indent=2))
        records.append(record)
    refit_dataset = train_dataset if refit_dataset is None else refit_dataset
    if refits_reliability(model, refit_dataset):
        records.append(refit_reliability_heads(model, args, refit_dataset, eval_dataset, data_collator,
                                               embedding_cache))
    if args.push_to_hub:
        from accelerate import PartialState

        if PartialState().is_main_process:
            folder = Path(args.output_dir) / "final"
            model.save_pretrained(folder)
            if processor is not None:
                processor.save_pretrained(folder)
            push_trained_model(folder, args)
    return records


def refits_reliability(model, train_dataset=None) -> bool:
    """Whether `train_staged` refits `model`'s reliability heads after the last stage: a DMIL classifier with
    reliability heads, `reliability_refit_steps` > 0, heads to refit (`DmilConfig.refit_modalities`) and (where
    `train_dataset` is given) a split with the corruption column to learn from."""
    config = model.config
    return (hasattr(model, "refit_reliability") and hasattr(model.dmil, "reliability")
            and getattr(config, "reliability_refit_steps", 0) > 0 and bool(config.refit_modalities())
            and (train_dataset is None or CORRUPTION_INPUT in (getattr(train_dataset, "column_names", None) or ())))


def refit_split(model, train, modalities, max_rows: int | None = None):
    """The raw split that `model`'s reliability refit reads (`train_staged`'s `refit_dataset`, to be encoded like the
    training split): `train` (clean, before the stages' corruption) with `config.reliability_refit_corruption` of its
    rows copied per modality and corrupted (drawn once per dataset, seed 0, as the stages' copies are), or None where
    the model refits nothing or reads the training split (`reliability_refit_corruption=None`). The refit reads at most
    `max_rows` rows (default `REFIT_MAX_ROWS`, 16,384): a larger `train` is sampled first (seed 0), so that the
    towers never run on rows the refit would not read."""
    from .modeling_dmil import REFIT_MAX_ROWS

    share = getattr(model.config, "reliability_refit_corruption", None)
    if share is None or not refits_reliability(model):
        return None
    from .data import add_training_corruption

    keep = int((REFIT_MAX_ROWS if max_rows is None else max_rows) // (1.0 + share * len(modalities)))
    if keep < len(train):
        train = train.select(np.sort(np.random.default_rng(0).choice(len(train), keep, replace=False)))
    return add_training_corruption(train, modalities, share, seed=0)


def refit_reliability_heads(model, args: TrainingArguments, train_dataset, eval_dataset=None, data_collator=None,
                            embedding_cache=True) -> dict:
    """After the last stage: `model.refit_reliability` for `config.reliability_refit_steps` steps on batches of the
    training split as the last stage read them (its cached tower outputs, its batch size, shuffled with `args.seed`).
    Under several processes each refits on its own shard, then every process takes the main process's heads.
    Returns the record for `train_staged`'s list."""
    stage = stage_plan(model, args)[-1]
    stage_args = _stage_arguments(args, stage, model, True, "eval_accuracy")
    stage_train, _, cached = cached_stage_splits(model, stage_args, stage, train_dataset, eval_dataset,
                                                 embedding_cache)
    # The trainer only hands out the batches: nothing to evaluate or save.
    stage_args = dataclasses.replace(stage_args, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    collator = data_collator
    if data_collator is None:
        stage_train, _, collator = batched_splits(stage_train, None)
    trainer = DmilTrainer(model=model, args=stage_args, train_dataset=stage_train, data_collator=collator)
    start = time.perf_counter()
    losses = model.refit_reliability(trainer.get_train_dataloader(), model.config.reliability_refit_steps,
                                     seed=args.seed)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for parameter in model.dmil.reliability.parameters():
            torch.distributed.broadcast(parameter.data, src=0)
    seconds = time.perf_counter() - start
    if trainer.is_world_process_zero():
        logger.info("reliability_refit: %d steps of the heads of %s in %.1f s, loss %.4g -> %.4g", len(losses),
                    model.config.refit_modalities(), seconds, losses[0], losses[-1])
    return {"stage": "reliability_refit", "steps": len(losses), "train_seconds": seconds,
            "first_loss": losses[0], "last_loss": losses[-1],
            "embedding_cache": [{k: r[k] for k in ("split", "modality", "hit")} for r in cached]}


def push_trained_model(folder, args: TrainingArguments) -> str:
    """Push the model saved in `folder` to `args.hub_model_id` with [`dmil_hf.hub.push_model`] (honouring
    `hub_private_repo`, `hub_revision` and `hub_token`); call it on the main process only. The one way `dmil_hf`
    pushes a trained model: `train_staged` (with `args.push_to_hub`) and `dmil train --push-to-hub` both call it.
    Returns the commit URL."""
    from .hub import push_model

    return push_model(folder, args.hub_model_id, private=bool(args.hub_private_repo), revision=args.hub_revision,
                      token=args.hub_token)


# --- LoRA on the towers ------------------------------------------------------------------------------------------

def lora_target_modules(tower: torch.nn.Module) -> list[str]:
    """The attention projection names LoRA should adapt in `tower` (e.g. BERT: query/value; ViT, Whisper: q_proj/v_proj)."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, module in tower.named_modules() if isinstance(module, torch.nn.Linear)}
    for candidates in LORA_TARGET_CANDIDATES:
        if set(candidates) <= leaf_names:
            return list(candidates)
    raise ValueError(f"no attention projections found for LoRA in {type(tower).__name__}; pass target_modules.")


def apply_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.05, modalities=None, target_modules=None):
    """Wrap each transformer tower (all that `config.freeze_towers` does not freeze, or `modalities`) in a peft LoRA
    model: its base weights freeze, the adapters and the whole DMIL head stay trainable. Call before training (before
    the first `set_training_stage`). Naming a frozen tower in `modalities` is an error: frozen is frozen."""
    from peft import LoraConfig, get_peft_model

    encoders = model.base_model.encoders
    towers, frozen = encoders.towers, set(encoders.frozen_modalities)
    if modalities is not None and frozen & set(modalities):
        raise ValueError(f"LoRA asked for the towers {sorted(frozen & set(modalities))}, which config.freeze_towers "
                         "freezes; unfreeze them (LoRA is the middle way between frozen and fully trained) or leave "
                         "them out of `modalities`.")
    wrapped = []
    for modality, tower in list(towers.items()):
        if not isinstance(tower, PreTrainedModel) or modality in frozen or (
                modalities is not None and modality not in modalities):
            continue
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=target_modules or lora_target_modules(tower))
        towers[modality] = get_peft_model(tower, config)
        wrapped.append(modality)
    if not wrapped:
        raise ValueError("LoRA needs a transformer tower that config.freeze_towers does not freeze; this model has "
                         f"none (towers: {list(towers)}, frozen: {sorted(frozen)}).")
    return wrapped


def save_lora_adapters(model, directory: str | Path) -> list[str]:
    """Save each LoRA tower's adapter to `directory/<modality>/` (peft format)."""
    from peft import PeftModel

    saved = []
    for modality, tower in model.base_model.encoders.towers.items():
        if isinstance(tower, PeftModel):
            tower.save_pretrained(str(Path(directory) / modality))
            saved.append(modality)
    return saved


def merge_lora(model):
    """Merge LoRA adapters into their towers, leaving a plain model that `from_pretrained` loads anywhere."""
    from peft import PeftModel

    towers = model.base_model.encoders.towers
    for modality, tower in list(towers.items()):
        if isinstance(tower, PeftModel):
            towers[modality] = tower.merge_and_unload()
    return model


def load_lora_adapters(model, directory: str | Path) -> list[str]:
    """Attach adapters saved by `save_lora_adapters` to the (unmerged) towers of `model`."""
    from peft import PeftModel

    loaded = []
    towers = model.base_model.encoders.towers
    for path in sorted(Path(directory).iterdir()):
        if path.name not in towers:
            raise ValueError(f"adapter folder {path} names modality {path.name!r}; model has {list(towers)}.")
        towers[path.name] = PeftModel.from_pretrained(towers[path.name], str(path))
        loaded.append(path.name)
    return loaded


__all__ = [
    "DmilTrainer",
    "apply_lora",
    "batched_splits",
    "cached_stage_splits",
    "checkpoint_problem",
    "last_complete_checkpoint",
    "load_lora_adapters",
    "lora_target_modules",
    "merge_lora",
    "save_lora_adapters",
    "stage_plan",
    "train_staged",
]
