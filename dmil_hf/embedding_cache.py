"""The embedding cache: a frozen tower's pooled outputs, computed once per dataset split and reused by every stage
and epoch.

A frozen tower (`DmilConfig.freeze_towers`, or every tower in DMIL's stage 2, where the schedule freezes them) gives
the same pooled output for a sample in every epoch, so `dmil_hf.training.train_staged` computes it once, batched,
under `torch.inference_mode` and on the training device, and trains on a copy of the split where the tower's input
columns are replaced by `<modality>_tower_embeds` (the model skips a tower given that input and runs only its
projection, see [`DmilEncoders`]). The saved model is unchanged: it holds the towers and runs on raw inputs.

Each array lives in `<cache dir>/<modality>-<key>.npy`, where the key hashes the tower's weights, its class and
pooling, and the content of the split's input columns for that tower: a change to either is a new key, so a stale
array is never read. Beside it, `<modality>-<key>.json` (the sidecar) records its shape, size, SHA-256, modality,
split and date. An array is streamed to a temporary file batch by batch (never held whole in memory), the sidecar
likewise, and both are renamed into place, the sidecar last: an entry without its sidecar is incomplete. Before an
entry is used it is checked against its sidecar; a truncated, reshaped or altered one is named in a warning and built
again. Training reads the arrays memory-mapped (`np.load(mmap_mode="r")`, joined to the split without a copy), so
they cost page cache, not process memory. Under `accelerate launch`, the main process of each machine builds a
missing array while the others wait (`PartialState().local_main_process_first()`), then every process reads it; no
two processes of a machine write the same file. `dmil cache list` and `dmil cache clear` manage the default folder
([`list_entries`], [`clear_entries`]).

Example:
```python
from dmil_hf.embedding_cache import cache_tower_embeddings

cached, records = cache_tower_embeddings(model, {"train": train_split, "validation": validation_split},
                                         ["text", "audio"], "runs/mine/embeddings")
# cached["train"] has `text_tower_embeds` / `audio_tower_embeds` instead of the text and audio input columns.
```
"""

from __future__ import annotations

import calendar
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .data._build import with_columns
from .modeling_dmil import TOWER_EMBEDS
from .pretrained import cache_root

logger = logging.getLogger(__name__)

# Bump when what a cached array means changes (what is pooled, how the key is made, what an entry holds): old files
# are then ignored (format 2: the checksum sidecar).
CACHE_FORMAT = 2
# The files of an entry (`<modality>-<key>.npy` and its `.json` sidecar) and the temporary ones a write leaves behind
# when it is killed: what `clear_entries` may delete.
ENTRY_NAME = re.compile(r"^(?P<modality>[A-Za-z_][A-Za-z0-9_]*)-(?P<key>[0-9a-f]{32})\.npy$")
CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # the sidecar's date, UTC
TEMPORARY_NAME = re.compile(r"^\.[A-Za-z_][A-Za-z0-9_]*-[0-9a-f]{32}\.(npy|json)\..+\.tmp$")


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


def tower_embedding_batches(model, dataset, modality: str, device=None, batch_size: int = 64,
                            show_progress: bool = True, description: str | None = None):
    """Yield the pooled outputs `(batch, tower width)` (float32 numpy) of the tower of `modality` on `dataset`, in
    row order: the tower in eval mode on `device` (default: where it is), batched, under `torch.inference_mode`. The
    tower's mode and device are restored afterwards."""
    from tqdm.auto import tqdm

    encoders = _encoders(model)
    tower = encoders.towers[modality]
    columns = tower_columns(model, dataset, modality)
    if not columns:
        raise ValueError(f"the dataset has no column for the {modality} tower (columns: {dataset.column_names}).")
    parameter = next(tower.parameters())
    original_device, was_training = parameter.device, tower.training
    device = torch.device(device) if device is not None else original_device
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
                yield pooled.float().cpu().numpy()
                bar.update(len(pooled))
    finally:
        tower.to(original_device).train(was_training)
        encoders.apply_freezing()


def sidecar_path(path: Path) -> Path:
    """The sidecar of the entry `path` (`<modality>-<key>.json` beside `<modality>-<key>.npy`)."""
    return Path(path).with_suffix(".json")


def _temporary(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def _publish(tmp: str, path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the cache gets the usual permissions
    os.replace(tmp, path)


def write_entry(path, batches, shape: tuple[int, int], **info) -> dict:
    """Stream the float32 `batches` (arrays of `shape[1]` columns, `shape[0]` rows in all) into the entry `path`
    (`.npy`), hashing them on the way, then its sidecar; each goes to a temporary file first and is renamed into
    place, the sidecar last. `info` (modality, split, ...) joins the sidecar. Returns the sidecar's content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                  "fortran_order": False, "shape": tuple(shape)})
    hasher, written, rows = hashlib.sha256(header.getvalue()), len(header.getvalue()), 0
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(header.getvalue())
            for batch in batches:
                data = np.ascontiguousarray(batch, dtype="<f4")
                if data.ndim != 2 or data.shape[1] != shape[1]:
                    raise ValueError(f"a batch for {str(path)!r} has shape {data.shape}; expected (rows, {shape[1]}).")
                hasher.update(data)
                handle.write(data.data)
                written, rows = written + data.nbytes, rows + len(data)
        if rows != shape[0]:
            raise ValueError(f"{rows} rows were written to {str(path)!r}; expected {shape[0]}.")
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    sidecar = {"format": CACHE_FORMAT, **info, "shape": list(shape), "dtype": "float32", "bytes": written,
               "sha256": hasher.hexdigest(), "created": time.strftime(CREATED_FORMAT, time.gmtime())}
    fd, tmp = _temporary(sidecar_path(path))
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(sidecar, handle, indent=2)
        _publish(tmp, sidecar_path(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return sidecar


def _file_sha256(path: Path) -> str:
    """SHA-256 of the file, read in chunks (page cache, not this process's memory)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def read_sidecar(path) -> dict | None:
    """The sidecar of the entry `path` as a dict, or None when it is missing or does not read as one."""
    try:
        sidecar = json.loads(sidecar_path(Path(path)).read_text())
    except (OSError, ValueError):
        return None
    return sidecar if isinstance(sidecar, dict) else None


def entry_problem(path, expected_shape: tuple[int, int] | None = None, checksum: bool = True) -> str | None:
    """What is wrong with the cache entry `path` (missing, no sidecar, truncated, another shape than its sidecar's
    or than `expected_shape`, bytes that no longer match the SHA-256), or None when it can be used. `checksum=False`
    skips the one check that reads the whole file."""
    path = Path(path)
    if not path.is_file():
        return "the array file is missing"
    sidecar = read_sidecar(path)
    if sidecar is None:
        return (f"its sidecar {sidecar_path(path).name} is missing or unreadable (an interrupted write, or an entry "
                "of an older dmil_hf)")
    size = path.stat().st_size
    if size != sidecar.get("bytes"):
        return f"it holds {size} bytes where its sidecar records {sidecar.get('bytes')} (truncated or overwritten)"
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(handle)
    except (OSError, ValueError) as err:
        return f"its header does not read as a .npy array ({err})"
    recorded = tuple(sidecar.get("shape") or ())
    if tuple(shape) != recorded or dtype != np.dtype("<f4"):
        return f"it holds a {dtype} array of shape {tuple(shape)}; its sidecar records float32 {recorded}"
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        return f"it holds an array of shape {tuple(shape)}; expected {tuple(expected_shape)}"
    if checksum and _file_sha256(path) != sidecar.get("sha256"):
        return "its bytes changed since it was written (SHA-256 differs from its sidecar)"
    return None


def _distributed_state():
    """accelerate's state of this process, set up as TrainingArguments sets it up: CPU-only processes under
    `accelerate launch` form one job only with ACCELERATE_USE_CPU (otherwise each would see a world of one and build
    its own copy)."""
    from accelerate import PartialState

    return PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))


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
    from accelerate.utils import broadcast_object_list
    from datasets import Dataset

    state = _distributed_state()
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
            shape = (len(splits[split]), _encoders(model).tower_width(modality))
            problem = entry_problem(path, shape) if path.exists() or sidecar_path(path).exists() else None
            hit = path.exists() and problem is None
            if problem is not None and state.is_local_main_process:
                logger.warning("Embedding cache entry %s is damaged: %s. Building it again.", path, problem)
            if not hit and state.is_local_main_process:
                batches = tower_embedding_batches(model, splits[split], modality, device, batch_size, show_progress,
                                                  f"Caching {modality} tower embeddings ({split})")
                write_entry(path, batches, shape, modality=modality, split=split,
                            tower=type(_encoders(model).towers[modality]).__name__)
            elif not hit:
                raise RuntimeError(f"the main process did not write the embedding cache {str(path)!r} "
                                   f"({problem or 'it is missing'}); is the cache folder writable and shared by the "
                                   "processes of this machine?")
            array = np.load(path, mmap_mode="r")  # pages are read as training touches them, never copied
            out[split] = with_columns(out[split], {f"{modality}_{TOWER_EMBEDS}": array}, fingerprint=key,
                                      drop=columns)
            records.append({"split": split, "modality": modality, "path": str(path), "hit": hit})
            logger.info("Embedding cache %s: %s tower on %s (%s).", "hit" if hit else "built", modality, split, path)
    return out, records


def with_frozen_tower_embeddings(model, dataset, cache_dir=True):
    """
    `dataset` (an encoded split) with the input columns of the model's frozen towers (`config.freeze_towers`)
    replaced by their pooled outputs from the embedding cache, computed there first if missing: what evaluation reads,
    so that measuring a model on many variants of a test set (the degraded sets of `dmil evaluate --degraded` and
    `dmil bench`, each leaving most modalities as they are) runs each frozen tower once per distinct input, for every
    model that shares the tower. The predictions are those of the towers run live.

    `cache_dir`: True for the default folder (`$DMIL_HF_CACHE/embeddings`), a folder, or False (the dataset as it
    is). Models without frozen towers, and splits without a frozen tower's columns, pass through unchanged.
    """
    encoders = getattr(getattr(model, "base_model", model), "encoders", None)
    frozen = list(getattr(encoders, "frozen_modalities", ()))
    if not cache_dir or not frozen:
        return dataset
    # Building an entry is collective under `accelerate launch` (every process waits for the main one); evaluation
    # runs on the main process alone, so there the towers run live.
    if _distributed_state().num_processes > 1:
        return dataset
    folder = default_cache_dir() if cache_dir is True else Path(cache_dir)
    cached, _ = cache_tower_embeddings(model, {"evaluation": dataset}, frozen, folder, show_progress=False)
    return cached["evaluation"]


def list_entries(cache_dir=None, checksum: bool = False) -> list[dict]:
    """The entries of the cache folder (default [`default_cache_dir`]), oldest first: `path`, `modality`, `split`,
    `shape`, `bytes` (array and sidecar), `created` (Unix time: the sidecar's date, else the file's), `problem`
    (None when usable; see [`entry_problem`], whose SHA-256 check runs only with `checksum`). Files the cache did
    not write are not listed."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        return []
    entries = []
    for path in folder.iterdir():
        match = ENTRY_NAME.match(path.name)
        if match is None or not path.is_file() or path.is_symlink():
            continue
        sidecar = read_sidecar(path) or {}
        try:
            stamp = calendar.timegm(time.strptime(sidecar["created"], CREATED_FORMAT))
        except (KeyError, TypeError, ValueError):
            stamp = None
        side = sidecar_path(path)
        entries.append({"path": path, "modality": match["modality"], "split": sidecar.get("split"),
                        "shape": tuple(sidecar["shape"]) if sidecar.get("shape") else None,
                        "bytes": path.stat().st_size + (side.stat().st_size if side.is_file() else 0),
                        "created": stamp if stamp is not None else path.stat().st_mtime,
                        "problem": entry_problem(path, checksum=checksum)})
    return sorted(entries, key=lambda entry: (entry["created"], entry["path"].name))


def clear_entries(cache_dir=None, older_than_days: float | None = None) -> list[Path]:
    """Delete the entries of the cache folder (default [`default_cache_dir`]) and what interrupted writes left
    there (temporary files an hour old), or with `older_than_days` only those created more than that many days ago;
    returns the deleted files.
    Only files directly in the folder whose names the cache gives are touched: nothing outside it, no sub-folder,
    no file of another name (a symbolic link is removed, never followed)."""
    if older_than_days is not None and not (isinstance(older_than_days, (int, float)) and older_than_days >= 0):
        raise ValueError(f"--older-than {older_than_days!r} must be a number of days >= 0.")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        return []
    cutoff = None if older_than_days is None else time.time() - 86400.0 * older_than_days
    doomed = []
    for entry in list_entries(folder):
        if cutoff is None or entry["created"] < cutoff:
            doomed += [entry["path"], sidecar_path(entry["path"])]
    # What interrupted writes left: a sidecar whose array is gone, and temporary files not written to for an hour (a
    # write in progress, e.g. by a run that is caching now, keeps its file's time fresh).
    abandoned = min(time.time() - 3600.0, cutoff if cutoff is not None else float("inf"))
    for path in folder.iterdir():
        orphan = path.name.endswith(".json") and ENTRY_NAME.match(path.with_suffix(".npy").name) and not \
            path.with_suffix(".npy").exists()
        if (orphan and (cutoff is None or path.lstat().st_mtime < cutoff)) or (
                TEMPORARY_NAME.match(path.name) and path.lstat().st_mtime < abandoned):
            doomed.append(path)
    deleted = []
    for path in doomed:
        if path.parent == folder and (path.is_file() or path.is_symlink()):
            path.unlink()
            deleted.append(path)
    return deleted


__all__ = ["CACHE_FORMAT", "cache_tower_embeddings", "clear_entries", "data_fingerprint",
           "default_cache_dir", "entry_problem", "list_entries", "read_sidecar", "sidecar_path", "tower_columns",
           "tower_embedding_batches", "tower_fingerprint", "with_frozen_tower_embeddings", "write_entry"]
