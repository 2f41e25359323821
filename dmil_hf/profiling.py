"""How much the decomposition head costs next to the towers (forward latency, eval mode, CPU or GPU), what a training
step of each method costs on the same towers and batch (throughput and peak memory on a GPU), and what
`torch.compile` changes in a training step."""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import tempfile
import time

import torch

from .configuration_dmil import TOWER_MODALITIES


def _elapsed(fn, device) -> float:
    """Seconds one `fn()` takes (on a GPU, until its kernels have finished)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _timed(fn, repeats: int, device) -> float:
    """Median seconds of `fn()` over `repeats` runs after two warm-up runs."""
    times = [_elapsed(fn, device) for _ in range(repeats + 2)]
    return statistics.median(times[2:])


def random_inputs(config, batch_size: int, text_length: int = 32, generator=None, cached=()) -> dict:
    """Random, valid inputs for every modality of `config` (shapes from each tower config); the modalities in
    `cached` get their tower's pooled output instead (`<modality>_tower_embeds`, as the embedding cache gives it)."""
    from .modeling_dmil import TOWER_EMBEDS

    inputs = {}
    for modality in config.modalities:
        sub = config.tower_config(modality)
        if modality in cached:
            width = config.feature_hidden_size if sub is None else sub.hidden_size
            inputs[f"{modality}_{TOWER_EMBEDS}"] = torch.randn(batch_size, width, generator=generator)
        elif sub is None:
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
    embeds, mask, _, pooled = base.encoders.encode(inputs, return_pooled=True)
    towers = _timed(lambda: base.encoders(inputs), repeats, device)
    if hasattr(model, "classify"):
        def head_only():  # the synergy component's own projections of the pooled outputs count as head
            views = base.synergy_inputs(pooled, mask) if model.config.synergy_source == "towers" else None
            return model.classify(base.decompose(embeds, mask, views))

        head = _timed(head_only, repeats, device)
    else:
        head = _timed(lambda: model(**inputs), repeats, device) - towers
    return {"device": str(device), "batch_size": batch_size, "towers_ms": 1000 * towers, "head_ms": 1000 * head,
            "head_fraction_of_towers": head / towers,
            "tower_parameters": sum(p.numel() for p in base.encoders.parameters()),
            "head_parameters": sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.encoders.parameters())}


# `dmil profile --train-step --setups`: what is timed. Each builds `(config, cached)`: the model's config and the
# modalities given as the cached pooled outputs of frozen towers (`<modality>_tower_embeds`) instead of raw inputs.
def _features_setup(feature_modalities: int = 2):
    """`feature_modalities` feature vectors of 16 values and 4 labels: the `synthetic` dataset's shape."""
    from .configuration_dmil import DmilConfig

    return DmilConfig(feature_modalities={m: 16 for m in "abcdefgh"[:feature_modalities]}, num_labels=4), ()


def _main_job_setup(cached=("text", "audio")):
    """`make run`'s model: frozen text and audio towers 384 wide (all-MiniLM-L6-v2 and Whisper tiny.en; their outputs
    come from the embedding cache, so their weights do not matter here), a tiny vision tower trained from scratch on
    1-channel images, 10 labels; the modalities in `cached` come as cached tower outputs."""
    from .configuration_dmil import DmilConfig
    from .towers import audio_tower_config, text_tower_config, vision_tower_config

    config = DmilConfig(text_config=text_tower_config("small"), vision_config=vision_tower_config("tiny"),
                        audio_config=audio_tower_config("small"), freeze_towers=["text", "audio"], num_labels=10)
    return config, tuple(cached)


def _towers_setup(size: str, modalities):
    from .configuration_dmil import DmilConfig
    from .towers import tower_configs

    return DmilConfig(**tower_configs(modalities, size, image_channels=3), num_labels=10), ()


def _setups() -> dict:
    from .towers import TOWER_SIZES

    setups = {
        "features": _features_setup,
        "main-job": _main_job_setup,  # stage 3 of `make run`: the vision tower runs live
        "main-job-head": lambda: _main_job_setup(("text", "vision", "audio")),  # every tower's output cached
    }
    setups.update({size: (lambda modalities, size=size: _towers_setup(size, modalities)) for size in TOWER_SIZES})
    return setups


TRAIN_STEP_SETUPS = tuple(_setups())


def train_step_setup(name: str, feature_modalities: int = 2, modalities=TOWER_MODALITIES):
    """`(config, cached modalities)` of a [`TRAIN_STEP_SETUPS`] name: `features` (`feature_modalities` 16-wide
    vectors, 4 labels: `synthetic`'s shape), `main-job` (`make run`: cached 384-wide text and audio, a tiny vision
    tower live), `main-job-head` (the same with every tower's output cached: the head alone), or a tower size of
    `dmil_hf.towers.TOWER_SIZES` (towers of that size for `modalities`, all live)."""
    setups = _setups()
    if name not in setups:
        raise ValueError(f"unknown train-step setup {name!r}; expected one of {list(setups)}.")
    if name == "features":
        return setups[name](feature_modalities)
    return setups[name]() if name.startswith("main-job") else setups[name](modalities)


@contextlib.contextmanager
def _inductor_cache(folder):
    """Inductor's on-disk cache (compiled graphs and kernels) in `folder` while the block runs."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def _build_step(method, config, stage, device, inputs, labels, precision, compile_model=False):
    """A function that runs one training step (forward with labels under `precision`, backward, AdamW) of a new
    `method` model, seeded as every other."""
    from .methods import build_model, method_of

    torch.manual_seed(0)
    model = build_model(method, copy.deepcopy(config)).to(device)
    if method_of(model).staged:
        model.set_training_stage(stage)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:  # Trainer's default optimizer (adamw_torch_fused) where this torch has it for the device
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    except (RuntimeError, ValueError):
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    # As `dmil train --torch-compile` (TrainingArguments.torch_compile) compiles it: inductor, default mode.
    forward = torch.compile(model) if compile_model else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            loss = forward(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def profile_train_step(config, methods=("dmil", "joint"), batch_size: int = 64, steps: int = 50, stage: int = 3,
                       device: str | None = None, text_length: int = 32, cached=(), compile: bool = False,
                       precision: str = "fp32", steps_per_epoch: int | None = None) -> dict:
    """
    Median wall time of one bare training step (forward with labels, backward, AdamW step: what `Trainer` runs per
    batch, without its data loading, logging, evaluation and checkpoints) of each of `methods`, built by
    [`dmil_hf.baselines.build_model`] from `config` with the same seed, on the same random batch (`cached`
    modalities given as cached tower outputs). DMIL trains in `stage`. The methods take turns step by step
    (A B A B ...), so a machine whose speed drifts slows them alike; `ratio_to_<first method>` divides each median
    by the first method's. `precision="bf16"` runs the forward under bfloat16 autocast (as `Trainer`'s `bf16=True`).

    With `compile`, every method is also built again under `torch.compile` and takes its turns beside the eager ones:
    `compiled_step_ms`, `compile_speedup` (eager / compiled), `compile_seconds` (the first step less a compiled step:
    the training graph's compilation, forward and backward, with inductor's on-disk cache empty, as at a first run),
    `compile_seconds_warm` (the same compiled again from that cache, as a later run with the same shapes), and, where
    compiling saves time, `break_even_steps` / `break_even_steps_warm` (steps before the compile time is earned back)
    and, with `steps_per_epoch`, `break_even_epochs` / `break_even_epochs_warm`; None where it never is.
    `dmil train --torch-compile` also compiles the evaluation graph and may recompile for a last, smaller batch, so a
    run pays more than these.

    Returns also `samples_per_second` and, on CUDA, `peak_memory_mb`: each method's own peak of allocated memory (its
    model, optimizer state and activations) over its warm-up steps.

    Example:
    ```python
    >>> from dmil_hf import DmilConfig
    >>> result = profile_train_step(DmilConfig(feature_modalities={"a": 8, "b": 8}, num_labels=3), steps=5)
    >>> sorted(result["step_ms"])
    ['dmil', 'joint']
    ```
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16'; got {precision!r}.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(0)
    inputs = {k: v.to(device) for k, v in random_inputs(config, batch_size, text_length, generator, cached).items()}
    labels = torch.randint(0, max(config.num_labels, 1), (batch_size,), generator=generator).to(device)
    if config.num_labels == 1:
        labels = labels.float()
    cuda = device.type == "cuda"
    step_fns, peak_mb, compile_seconds = {}, {}, {}
    for method in methods:
        if cuda:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        step_fns[method] = _build_step(method, config, stage, device, inputs, labels, precision)
        for _ in range(3):
            _elapsed(step_fns[method], device)
        if cuda:
            peak_mb[method] = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    warm_seconds = {}
    # Compiled code goes to a fresh inductor cache, kept while the steps run. Cold: the cache holds nothing of the
    # model (a first run); warm: dynamo's in-process code reset, the model is compiled again and finds its graphs in
    # that cache (a later run with the same shapes). A reset also drops the compiled code of the methods before, which
    # their warm-up steps below then read back from the cache.
    with tempfile.TemporaryDirectory(prefix="dmil-inductor-") as folder, _inductor_cache(folder):
        for method in methods if compile else ():
            torch._dynamo.reset()
            compile_seconds[method] = _elapsed(
                _build_step(method, config, stage, device, inputs, labels, precision, True), device)
            torch._dynamo.reset()
            step_fns[(method, "compiled")] = _build_step(method, config, stage, device, inputs, labels, precision, True)
            warm_seconds[method] = _elapsed(step_fns[(method, "compiled")], device)
        times = {name: [] for name in step_fns}
        for i in range(steps + 2):
            for name, step in step_fns.items():
                seconds = _elapsed(step, device)
                if i >= 2:
                    times[name].append(seconds)
    median_ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    step_ms = {method: median_ms[method] for method in methods}
    first = methods[0]
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    result = {"device": str(device), "device_name": name, "torch": torch.__version__, "batch_size": batch_size,
              "steps": steps, "dmil_stage": stage, "precision": precision, "threads": torch.get_num_threads(),
              "modalities": list(config.modalities), "cached": list(cached), "step_ms": step_ms,
              f"ratio_to_{first}": {method: ms / step_ms[first] for method, ms in step_ms.items()},
              "samples_per_second": {method: 1000 * batch_size / ms for method, ms in step_ms.items()},
              "peak_memory_mb": peak_mb or None}
    if compile:
        compiled_ms = {method: median_ms[(method, "compiled")] for method in methods}
        result["compiled_step_ms"] = compiled_ms
        result["compile_speedup"] = {m: step_ms[m] / compiled_ms[m] for m in methods}
        saved = {m: (step_ms[m] - compiled_ms[m]) / 1000 for m in methods}
        if steps_per_epoch:
            result["steps_per_epoch"] = steps_per_epoch
        for suffix, first_step in (("", compile_seconds), ("_warm", warm_seconds)):
            seconds = {m: first_step[m] - compiled_ms[m] / 1000 for m in methods}
            steps_needed = {m: seconds[m] / saved[m] if saved[m] > 0 else None for m in methods}
            result[f"compile_seconds{suffix}"] = seconds
            result[f"break_even_steps{suffix}"] = steps_needed
            if steps_per_epoch:
                result[f"break_even_epochs{suffix}"] = {m: None if n is None else n / steps_per_epoch
                                                        for m, n in steps_needed.items()}
    return result


__all__ = ["TRAIN_STEP_SETUPS", "profile_head", "profile_train_step", "random_inputs", "train_step_setup"]
