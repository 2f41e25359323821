"""Safe loading of saved DMIL / baseline checkpoints (safetensors only unless the caller opts in)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors import safe_open

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def check_weights(model_dir: str | Path, allow_pickle: bool = False) -> Path:
    """Make sure `model_dir` holds readable safetensors weights; refuse pickle-only folders unless allowed."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} does not exist.")
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json; expected a folder written by save_pretrained.")
    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    if not files:
        pickles = [name for name in PICKLE_WEIGHTS if (model_dir / name).exists()]
        if pickles and not allow_pickle:
            raise ValueError(
                f"{model_dir} holds only pickle weights ({', '.join(pickles)}), which can run arbitrary code when "
                "loaded. Re-save them as safetensors, or pass allow_pickle=True (--allow-pickle) if you trust them."
            )
        if not pickles:
            raise FileNotFoundError(f"{model_dir} holds no weights (expected model.safetensors).")
        return model_dir
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"weights file {path} is corrupted or truncated ({err}); re-save or re-download it.") from None
        if path.stat().st_size == 0:
            raise ValueError(f"weights file {path} is empty; re-save or re-download it.")
    return model_dir


def saved_tensor_names(model_dir: str | Path) -> set[str] | None:
    """Names of the tensors stored in `model_dir`'s safetensors file(s), read from their headers; None when the
    folder holds no safetensors weights (pickle only)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    path = model_dir / "model.safetensors"
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def loaded_tensor_names(model, names) -> set[str]:
    """The tensors of `model` that saved tensors named `names` fill when `from_pretrained` loads them: each name passes
    through the conversions transformers registers for the model (e.g. DMIL's per-modality head layout, stacked on
    load), as `from_pretrained` renames it; a converter that writes several tensors fills all of them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    targets = {pattern: c.target_patterns for c in converters for pattern in c.source_patterns}
    state = model.state_dict()
    loaded = set()
    for name in names:
        renamed, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        if renamed not in state and name in state:  # as from_pretrained: a name the model has is kept
            renamed, pattern = name, None
        loaded.update({renamed} if pattern is None else {renamed.replace(targets[pattern][0], t) for t in targets[pattern]})
    return loaded


def check_complete(model, model_dir: str | Path) -> None:
    """Refuse a model whose saved weights lack some of its tensors: `from_pretrained` would have initialised those at
    random and only logged it. Raises ValueError naming the folder and the missing tensors."""
    names = saved_tensor_names(model_dir)
    if names is None:
        return
    names = loaded_tensor_names(model, names)
    expected = set(model.state_dict())
    # Tied weights are stored once; their other names are legitimately absent.
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = sorted(k for k in expected - names if k not in tied)
    if missing:
        raise ValueError(f"the checkpoint in {str(model_dir)!r} is incomplete: its weights lack {len(missing)} of the "
                         f"model's {len(expected)} tensors ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}), which would be initialised at random. Expected "
                         "every tensor that save_pretrained writes; re-save or re-download the checkpoint.")


def load_model(model_dir: str | Path, allow_pickle: bool = False, **kwargs):
    """Load a DMIL or baseline classifier from a folder, after checking its weights; a checkpoint that lacks some of
    the model's tensors is refused (see `check_complete`)."""
    import dmil_hf  # noqa: F401  (registers the dmil model types with the Auto classes)
    from transformers import AutoModelForSequenceClassification

    model_dir = check_weights(model_dir, allow_pickle=allow_pickle)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=not allow_pickle or None,
                                                                   **kwargs)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"could not load the weights in {model_dir}: {err}") from None
    check_complete(model, model_dir)
    return model


__all__ = ["check_complete", "check_weights", "load_model", "loaded_tensor_names", "saved_tensor_names"]
