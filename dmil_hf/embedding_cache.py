"""The embedding cache: a frozen tower's pooled outputs, computed once per dataset split and reused by every stage
and epoch.

A frozen tower (`DmilConfig.freeze_towers`, or every tower in DMIL's stage 2, where the schedule freezes them) gives
the same pooled output for a sample in every epoch, so `dmil_hf.training.train_staged` computes it once, batched,
under `torch.inference_mode` and on the training device, and trains on a copy of the split where the tower's input
columns are replaced by `<modality>_tower_embeds` (the model skips a tower given that input and runs only its
projection, see [`DmilEncoders`]). The saved model is unchanged: it holds the towers and runs on raw inputs.

Each array lives in `<cache dir>/<modality>-<key>.npy`, where the key hashes the tower's weights, its class and
pooling, and the content of the split's input columns for that tower: a change to either is a new key, so a stale
array is never read. Files are written to a temporary name and renamed. Under `accelerate launch`, the main process
of each machine builds a missing array while the others wait (`PartialState().local_main_process_first()`), then
every process reads it; no two processes of a machine write the same file.

Example:
```python
from dmil_hf.embedding_cache import cache_tower_embeddings

cached, records = cache_tower_embeddings(model, {"train": train_split, "validation": validation_split},
                                         ["text", "audio"], "runs/mine/embeddings")
# cached["train"] has `text_tower_embeds` / `audio_tower_embeds` instead of the text and audio input columns.
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .modeling_dmil import TOWER_EMBEDS
from .pretrained import cache_root

logger = logging.getLogger(__name__)

# Bump when what a cached array means changes (what is pooled, how the key is made): old files are then ignored.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """`$DMIL_HF_CACHE/embeddings`, default `~/.cache/dmil_hf/embeddings`."""
    return cache_root() / "embeddings"


def _encoders(model):
    encoders = getattr(getattr(model, "base_model", model), "encoders", None)
    if encoders is None:
        raise TypeError(f"{type(model).__name__} has no `encoders`; expected a dmil_hf model.")
    return encoders


def _update_with_tensor(hasher, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())  # raw bytes, for every dtype (bfloat16 too)


def tower_fingerprint(model, modality: str) -> str:
    """Hash of everything that decides the tower's pooled output besides the data: its weights and buffers, its
    class, the pooling (`config.tower_pooling`) and the cache format."""
    encoders = _encoders(model)
    tower = encoders.towers[modality]
    hasher = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "modality": modality, "class": type(tower).__qualname__,
                                        "pooling": encoders.config.tower_pooling}).encode())
    for name, tensor in tower.state_dict().items():
        hasher.update(name.encode())
        _update_with_tensor(hasher, tensor)
    return hasher.hexdigest()


def data_fingerprint(dataset, columns, batch_size: int = 1024) -> str:
    """Hash of the content of `columns` of `dataset`, row by row (so a changed value, row order or length is a new
    hash; datasets' own `_fingerprint` can be random when a transform cannot be hashed)."""
    hasher = hashlib.sha256(json.dumps({"rows": len(dataset), "columns": list(columns)}).encode())
    view = dataset.select_columns(list(columns)).with_format("numpy")
    for start in range(0, len(view), batch_size):
        batch = view[start:start + batch_size]
        for column in columns:
            values = batch[column]
            for array in (values if getattr(values, "dtype", None) == object else [values]):
                array = np.ascontiguousarray(array)
                hasher.update(f"{column}{array.dtype}{array.shape}".encode())
                hasher.update(array.reshape(-1).view(np.uint8))
    return hasher.hexdigest()


def tower_columns(model, dataset, modality: str) -> list[str]:
    """The columns of `dataset` that the model routes to the tower of `modality` (as `DmilEncoders.route` does: a
    column belongs to the first modality whose `<name>_` prefix it has)."""
    modalities = _encoders(model).modalities
    owner = {c: next((m for m in modalities if c.startswith(f"{m}_")), None) for c in dataset.column_names}
    return [c for c, m in owner.items() if m == modality and c != f"{modality}_{TOWER_EMBEDS}"]


def compute_tower_embeddings(model, dataset, modality: str, device=None, batch_size: int = 64,
                             show_progress: bool = True, description: str | None = None) -> np.ndarray:
    """The pooled outputs `(rows, tower width)` (float32) of the tower of `modality` on `dataset`, in row order:
    the tower in eval mode on `device` (default: where it is), batched, under `torch.inference_mode`. The tower's
    mode and device are restored afterwards."""
    from tqdm.auto import tqdm

    encoders = _encoders(model)
    tower = encoders.towers[modality]
    columns = tower_columns(model, dataset, modality)
    if not columns:
        raise ValueError(f"the dataset has no column for the {modality} tower (columns: {dataset.column_names}).")
    parameter = next(tower.parameters())
    original_device, was_training = parameter.device, tower.training
    device = torch.device(device) if device is not None else original_device
    out = np.empty((len(dataset), encoders.tower_width(modality)), dtype=np.float32)
    view = dataset.select_columns(columns).with_format("torch")
    tower.to(device).eval()
    try:
        with torch.inference_mode(), tqdm(total=len(dataset), unit="rows", disable=not show_progress,
                                          desc=description or f"Caching {modality} tower embeddings") as bar:
            for start in range(0, len(dataset), batch_size):
                batch = view[start:start + batch_size]
                routed = encoders.route({c: batch[c].to(device) for c in columns})
                encoders.check_values(routed)
                pooled, _ = encoders.pooled_output(modality, routed[modality])
                out[start:start + len(pooled)] = pooled.float().cpu().numpy()
                bar.update(len(pooled))
    finally:
        tower.to(original_device).train(was_training)
        encoders.apply_freezing()
    return out


def _write_atomically(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the cache gets the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _with_column(dataset, drop: list[str], name: str, array: np.ndarray):
    """`dataset` without `drop`, plus the float32 matrix `array` as column `name`; the dataset's format is kept."""
    import pyarrow as pa
    from datasets import Dataset, concatenate_datasets

    values = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(array).reshape(-1)), array.shape[1])
    column = Dataset(pa.table({name: values}))
    kept = dataset.remove_columns(drop).with_format(None)
    merged = concatenate_datasets([kept, column], axis=1)
    form = dataset.format
    return merged.with_format(form["type"], **form.get("format_kwargs", {})) if form.get("type") else merged


def cache_tower_embeddings(model, splits: dict, modalities, cache_dir, device=None, batch_size: int = 64,
                           show_progress: bool = True) -> tuple[dict, list[dict]]:
    """
    Replace, in every split, the input columns of the towers of `modalities` by their pooled outputs
    `<modality>_tower_embeds`, read from `cache_dir` or computed once and stored there.

    Args:
        model: a dmil_hf model (DMIL or a baseline); its towers are used as they are now.
        splits (`dict[str, datasets.Dataset]`): e.g. `{"train": ..., "validation": ...}`; values that are not a
            `datasets.Dataset`, that have a transform (`set_transform`: rows may change between epochs) or that lack
            a modality's columns are passed through for that modality.
        modalities: the modalities whose towers to cache (frozen ones: the cache is only right while they do not
            change).
        cache_dir: folder of the `.npy` arrays (created when missing).
        device: where the towers run (default: each tower's own device).

    Returns:
        `(splits, records)`: the new splits, and one record per cached array (`split`, `modality`, `path`, `hit`:
        whether it was read from the cache rather than computed by this process).
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from datasets import Dataset

    # As TrainingArguments sets the state up: CPU-only processes under `accelerate launch` form one job only with
    # ACCELERATE_USE_CPU (otherwise each would see a world of one and build its own copy).
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    cache_dir = Path(cache_dir)
    plans = []  # (split, modality, columns)
    for split, dataset in splits.items():
        if not isinstance(dataset, Dataset):
            continue
        if dataset.format.get("type") == "custom":  # set_transform: rows may differ each epoch (augmentation)
            logger.warning("Split %r has a transform (set_transform / with_transform); its towers run live, uncached.",
                           split)
            continue
        for modality in modalities:
            columns = tower_columns(model, dataset, modality)
            if columns:
                plans.append((split, modality, columns))
    if not plans:
        return dict(splits), []
    towers = {m: tower_fingerprint(model, m) for m in {m for _, m, _ in plans}}
    keys = [hashlib.sha256(f"{towers[m]}:{data_fingerprint(splits[s], cols)}".encode()).hexdigest()[:32]
            for s, m, cols in plans]
    if state.num_processes > 1:  # every process reads the files the main one names, even if a hash differed
        keys = broadcast_object_list([keys])[0]
    out, records = dict(splits), []
    with state.local_main_process_first():
        for (split, modality, columns), key in zip(plans, keys):
            path = cache_dir / f"{modality}-{key}.npy"
            hit = path.exists()
            if hit:
                array = np.load(path)
            elif state.is_local_main_process:
                array = compute_tower_embeddings(model, splits[split], modality, device, batch_size,
                                                 show_progress and state.is_local_main_process,
                                                 f"Caching {modality} tower embeddings ({split})")
                _write_atomically(path, array)
            else:
                raise RuntimeError(f"the main process did not write the embedding cache {str(path)!r}; is the cache "
                                   "folder writable and shared by the processes of this machine?")
            if array.shape != (len(splits[split]), _encoders(model).tower_width(modality)):
                raise ValueError(f"the embedding cache {str(path)!r} holds an array of shape {array.shape}; expected "
                                 f"({len(splits[split])}, {_encoders(model).tower_width(modality)}). Delete it.")
            out[split] = _with_column(out[split], columns, f"{modality}_{TOWER_EMBEDS}", array)
            records.append({"split": split, "modality": modality, "path": str(path), "hit": hit})
            logger.info("Embedding cache %s: %s tower on %s (%s).", "hit" if hit else "built", modality, split, path)
    return out, records


__all__ = ["CACHE_FORMAT", "cache_tower_embeddings", "compute_tower_embeddings", "data_fingerprint",
           "default_cache_dir", "tower_columns", "tower_fingerprint"]
