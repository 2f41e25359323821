"""How much the decomposition head costs next to the towers (forward latency, eval mode, CPU or GPU), what a training
step of each method costs on the same towers and batch, and what `torch.compile` changes in a training step."""

from __future__ import annotations

import copy
import statistics
import time

import torch


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


def random_inputs(config, batch_size: int, text_length: int = 32, generator=None) -> dict:
    """Random, valid inputs for every modality of `config` (shapes from each tower config)."""
    inputs = {}
    for modality in config.modalities:
        sub = config.tower_config(modality)
        if sub is None:
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


def profile_compile(model, batch_size: int = 32, steps: int = 20, device: str | None = None, fullgraph: bool = True,
                    text_length: int = 32) -> dict:
    """
    Median wall time of one training step (forward with labels, backward, SGD step) of `model` in eager mode and
    under `torch.compile(fullgraph=fullgraph)`, each on its own copy of the model, from the same random batch.
    Compiled steps are timed after two warm-up steps; the first (compiling) step is reported apart, as
    `compile_seconds`.

    Example:
    ```python
    >>> from dmil_hf import DmilConfig, DmilForMultimodalClassification
    >>> model = DmilForMultimodalClassification(DmilConfig(feature_modalities={"a": 8, "b": 8}, num_labels=3))
    >>> result = profile_compile(model, batch_size=64, steps=10)
    >>> sorted(result)[:3]
    ['batch_size', 'compile_seconds', 'compiled_step_ms']
    ```
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(0)
    inputs = {k: v.to(device) for k, v in random_inputs(model.config, batch_size, text_length, generator).items()}
    labels = torch.randint(0, max(model.config.num_labels, 1), (batch_size,), generator=generator).to(device)
    if model.config.num_labels == 1:
        labels = labels.float()

    def step_fn(module):
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3)

        def step():
            loss = module(**inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
        return step

    eager = copy.deepcopy(model).to(device).train()
    eager_ms = 1000 * _timed(step_fn(eager), steps, device)
    compiled_model = copy.deepcopy(model).to(device).train()
    compiled_step = step_fn(torch.compile(compiled_model, fullgraph=fullgraph))
    start = time.perf_counter()
    compiled_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    compile_seconds = time.perf_counter() - start
    compiled_ms = 1000 * _timed(compiled_step, steps, device)
    return {"device": str(device), "batch_size": batch_size, "steps": steps, "eager_step_ms": eager_ms,
            "compiled_step_ms": compiled_ms, "speedup": eager_ms / compiled_ms, "compile_seconds": compile_seconds,
            "threads": torch.get_num_threads(), "modalities": list(model.config.modalities)}


def profile_train_step(config, methods=("dmil", "joint"), batch_size: int = 64, steps: int = 50, stage: int = 3,
                       device: str | None = None, text_length: int = 32) -> dict:
    """
    Median wall time of one bare training step (forward with labels, backward, AdamW step: what `Trainer` runs per
    batch, without its data loading, logging, evaluation and checkpoints) of each of `methods`, built by
    [`dmil_hf.baselines.build_model`] from `config` with the same seed, on the same random batch. DMIL trains in
    `stage`. The methods take turns step by step (A B A B ...), so a machine whose speed drifts slows them alike;
    `ratio_to_<first method>` divides each median by the first method's.

    Example:
    ```python
    >>> from dmil_hf import DmilConfig
    >>> result = profile_train_step(DmilConfig(feature_modalities={"a": 8, "b": 8}, num_labels=3), steps=5)
    >>> sorted(result["step_ms"])
    ['dmil', 'joint']
    ```
    """
    from .methods import build_model, method_of

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(0)
    inputs = {k: v.to(device) for k, v in random_inputs(config, batch_size, text_length, generator).items()}
    labels = torch.randint(0, max(config.num_labels, 1), (batch_size,), generator=generator).to(device)
    if config.num_labels == 1:
        labels = labels.float()
    step_fns = {}
    for method in methods:
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

        def step(model=model, optimizer=optimizer):
            model(**inputs, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_fns[method] = step
    times = {method: [] for method in methods}
    for i in range(steps + 3):
        for method, step in step_fns.items():
            seconds = _elapsed(step, device)
            if i >= 3:
                times[method].append(seconds)
    step_ms = {method: 1000 * statistics.median(t) for method, t in times.items()}
    first = methods[0]
    return {"device": str(device), "batch_size": batch_size, "steps": steps, "dmil_stage": stage,
            "threads": torch.get_num_threads(), "modalities": list(config.modalities), "step_ms": step_ms,
            f"ratio_to_{first}": {method: ms / step_ms[first] for method, ms in step_ms.items()}}


__all__ = ["profile_compile", "profile_head", "profile_train_step", "random_inputs"]
