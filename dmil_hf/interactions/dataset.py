"""
From a dataset split in the `dmil_hf` schema to one numeric matrix per modality, for the interaction estimators.

Two representations:

- **defaults** (no model): `<name>_features` columns as they are; `text`: TF-IDF (scikit-learn `TfidfVectorizer`,
  word unigrams and bigrams) reduced to `dims` dimensions with `TruncatedSVD`; `image`: pixels scaled to [0, 1],
  flattened (images of different sizes are resized to a common size) and reduced with `PCA`; `audio`: log mel-band
  energies (`transformers.audio_utils.spectrogram`, 40 rectangular bands on the HTK mel scale up to the Nyquist
  frequency), mean and standard deviation over frames, reduced with `PCA`. The reductions are unsupervised and
  fitted on the split itself.
- **model** (`model=`): a trained DMIL (or baseline) model's projected tower embeddings, `model.base_model.encoders`
  on the split encoded by [`encode_split`] with the model's processor, shape `(N, hidden_size)` per modality. Modalities
  the model does not have fall back to the defaults.

[`modality_arrays_with_info`] also says, per modality, which representation was used (for reports).
"""

from __future__ import annotations

import numpy as np
from transformers.audio_utils import hertz_to_mel, spectrogram, window_function

from ..configuration_dmil import TOWERS, column_of

DEFAULT_DIMS = 32
MEL_BANDS = 40
FRAME_SECONDS = 0.025
HOP_SECONDS = 0.010


def _reduce(matrix: np.ndarray, dims: int, seed: int, sparse: bool = False) -> tuple[np.ndarray, int]:
    """`matrix` reduced to at most `dims` dimensions (TruncatedSVD for sparse input, else PCA); small inputs pass."""
    n, width = matrix.shape
    if width <= dims or n < 2:
        return (matrix.toarray() if sparse else np.asarray(matrix, dtype=np.float64)), width
    if sparse:
        from sklearn.decomposition import TruncatedSVD

        components = min(dims, width - 1, n)  # TruncatedSVD needs fewer components than features
        return TruncatedSVD(n_components=components, random_state=seed).fit_transform(matrix), components
    from sklearn.decomposition import PCA

    components = min(dims, n)
    return PCA(n_components=components, random_state=seed).fit_transform(matrix), components


def feature_matrix(split, modality: str) -> np.ndarray:
    """The `<modality>_features` column as a float array `(N, d)` (rows of a 2-D feature are flattened)."""
    column = f"{modality}_features"
    if column not in split.column_names:
        raise ValueError(f"the split has no column {column!r}; it has {split.column_names}.")
    values = split.select_columns([column]).with_format("numpy")[:][column]
    if values.dtype == object:  # variable-length rows come back as an object array
        values = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    return np.asarray(values, dtype=np.float64).reshape(len(values), -1)


def text_matrix(texts, dims: int = DEFAULT_DIMS, seed: int = 0) -> tuple[np.ndarray, str]:
    """TF-IDF (word 1-2 grams, sublinear tf) -> TruncatedSVD to `dims`; returns (matrix, description)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = ["" if t is None else str(t) for t in texts]
    try:
        tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1).fit_transform(texts)
    except ValueError as err:  # every text empty or only stop words
        raise ValueError(f"could not build TF-IDF features from the 'text' column: {err}") from None
    matrix, width = _reduce(tfidf, dims, seed, sparse=True)
    return matrix, f"tfidf(word 1-2 grams, {tfidf.shape[1]} terms) -> truncated SVD {width} dims"


def _image_array(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if getattr(image, "mode", None) in ("P", "CMYK", "YCbCr", "LAB", "HSV")
                       else image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[-1] == 4:  # drop alpha
        array = array[:, :, :3]
    return array


def image_matrix(images, dims: int = DEFAULT_DIMS, seed: int = 0, max_side: int = 32) -> tuple[np.ndarray, str]:
    """Pixels / 255 (or / max for non-uint8), flattened -> PCA to `dims`. Images of different sizes (or larger than
    `max_side`) are resized to one size (at most `max_side` x `max_side`); grayscale is repeated to RGB when the
    split mixes them."""
    from PIL import Image as PILImage

    arrays = [_image_array(image) for image in images]
    if not arrays:
        raise ValueError("the 'image' column is empty.")
    channels = max(a.shape[-1] for a in arrays)
    arrays = [np.repeat(a, channels, axis=-1) if a.shape[-1] != channels else a for a in arrays]
    sizes = {a.shape[:2] for a in arrays}
    note = ""
    if len(sizes) > 1 or max(max(s) for s in sizes) > max_side:
        height, width = max(sizes)
        scale = min(1.0, max_side / max(height, width))
        target = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL: (width, height)

        def resize(a):
            scaled = (a.astype(np.float64) / (255.0 if a.dtype == np.uint8 else max(float(a.max()), 1.0)) * 255)
            image = PILImage.fromarray(scaled.clip(0, 255).astype(np.uint8).squeeze(-1) if channels == 1
                                       else scaled.clip(0, 255).astype(np.uint8))
            out = np.asarray(image.resize(target, PILImage.BILINEAR))
            return out[:, :, None] if out.ndim == 2 else out

        arrays = [resize(a) for a in arrays]
        note = f", resized to {target[1]}x{target[0]}"
    stacked = np.stack(arrays)
    top = 255.0 if stacked.dtype == np.uint8 else max(float(np.abs(stacked).max()), 1.0)
    flat = stacked.reshape(len(stacked), -1).astype(np.float64) / top
    matrix, width = _reduce(flat, dims, seed)
    shape = "x".join(str(s) for s in stacked.shape[1:])
    return matrix, f"pixels/{top:g} ({shape}{note}) -> PCA {width} dims"


def log_mel_summary(waveform, sampling_rate: int, bands: int = MEL_BANDS) -> np.ndarray:
    """Mean and standard deviation over frames of log mel-band energies (25 ms Hann frames, 10 ms hop, `bands`
    rectangular bands equally spaced on the HTK mel scale up to the Nyquist frequency): a vector of `2 * bands`.
    The power spectrogram is `transformers.audio_utils.spectrogram`'s, with a filter bank that sums each FFT bin's
    power into its band."""
    wave = np.asarray(waveform, dtype=np.float64).reshape(-1)
    frame = max(16, int(round(FRAME_SECONDS * sampling_rate)))
    hop = max(1, int(round(HOP_SECONDS * sampling_rate)))
    if len(wave) < frame:
        wave = np.pad(wave, (0, frame - len(wave)))
    edges = np.linspace(0.0, hertz_to_mel(sampling_rate / 2.0, "htk"), bands + 1)
    bins = hertz_to_mel(np.fft.rfftfreq(frame, 1.0 / sampling_rate), "htk")
    band = np.clip(np.searchsorted(edges, bins, side="right") - 1, 0, bands - 1)
    energy = spectrogram(wave, window_function(frame, "hann", periodic=False), frame, hop, power=2.0, center=False,
                         mel_filters=np.eye(bands)[band], mel_floor=0.0, dtype=np.float64)  # (bands, frames)
    logs = np.log(energy + 1e-10)
    return np.concatenate([logs.mean(axis=1), logs.std(axis=1)])


def audio_matrix(waveforms, sampling_rates, dims: int = DEFAULT_DIMS, seed: int = 0) -> tuple[np.ndarray, str]:
    """[`log_mel_summary`] of each clip -> PCA to `dims`."""
    summaries = np.stack([log_mel_summary(w, int(r)) for w, r in zip(waveforms, sampling_rates)])
    matrix, width = _reduce(summaries, dims, seed)
    return matrix, (f"log mel-band energies ({MEL_BANDS} bands, {FRAME_SECONDS * 1000:g} ms frames), mean+std over "
                    f"frames -> PCA {width} dims")


def default_matrix(split, modality: str, dims: int = DEFAULT_DIMS, seed: int = 0) -> tuple[np.ndarray, str]:
    """The default representation of one modality of `split` (see the module docstring): (matrix, description)."""
    column = column_of(modality)
    if column not in split.column_names:
        raise ValueError(f"modality {modality!r} has no column {column!r} in the split; it has {split.column_names}.")
    if modality == "text":
        return text_matrix(split["text"], dims, seed)
    if modality == "vision":
        return image_matrix(split["image"], dims, seed)
    if modality == "audio":
        return audio_matrix(split["audio"], split["audio_sampling_rate"], dims, seed)
    matrix = feature_matrix(split, modality)
    return matrix, f"{column} as is ({matrix.shape[1]} dims)"


def model_embeddings(split, modalities, model, processor=None, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Projected tower embeddings `(N, hidden_size)` of `modalities` (all of them the model's) from
    `model.base_model.encoders`, computed batch-wise (eval mode, no gradients) on `encode_split(split, ...)`."""
    import torch

    from ..preprocess import encode_split

    order = list(model.config.modalities)
    unknown = [m for m in modalities if m not in order]
    if unknown:
        raise ValueError(f"the model has no modalities {unknown}; it has {order}.")
    if processor is None and any(m in TOWERS for m in modalities):
        raise ValueError(f"modalities {[m for m in modalities if m in TOWERS]} need the model's processor "
                         "(tokenizer / image processor / feature extractor); pass processor=.")
    encoded = encode_split(split, processor, list(modalities))
    columns = [c for c in encoded.column_names if c != "labels"]
    encoders = model.base_model.encoders
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = {m: [] for m in modalities}
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start:start + batch_size]
                embeds, _ = encoders({c: batch[c].to(device) for c in columns})
                for m in modalities:
                    chunks[m].append(embeds[:, order.index(m)].float().cpu().numpy())
    finally:
        model.train(was_training)
    return {m: np.concatenate(parts).astype(np.float64) for m, parts in chunks.items()}


def modality_arrays_with_info(split, modalities, model=None, processor=None, *, dims: int = DEFAULT_DIMS,
                              seed: int = 0, batch_size: int = 64) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """
    [`modality_arrays`] plus, per modality, a description of the representation used.

    Returns:
        `(arrays, representation)`: `dict[str, np.ndarray (N, d)]` in the order of `modalities`, and
        `dict[str, str]`.
    """
    modalities = list(modalities)
    if len(modalities) < 2:
        raise ValueError(f"interaction estimates need at least two modalities; got {modalities}.")
    from_model = [m for m in modalities if model is not None and m in model.config.modalities]
    if model is not None and not from_model:
        raise ValueError(f"the model's modalities {list(model.config.modalities)} share none with {modalities}.")
    arrays, info = {}, {}
    if from_model:
        embeddings = model_embeddings(split, from_model, model, processor, batch_size=batch_size)
        kind = type(model).__name__
        for m in from_model:
            info[m] = f"model: {kind}.base_model.encoders projected embedding ({embeddings[m].shape[1]} dims)"
    for m in modalities:
        if m in from_model:
            arrays[m] = embeddings[m]
        else:
            arrays[m], info[m] = default_matrix(split, m, dims, seed)
            if model is not None:
                info[m] = "default (the model lacks this modality): " + info[m]
    return arrays, {m: info[m] for m in modalities}


def modality_arrays(split, modalities, model=None, processor=None, *, dims: int = DEFAULT_DIMS, seed: int = 0,
                    batch_size: int = 64) -> dict[str, np.ndarray]:
    """
    One float matrix `(N, d)` per modality of a split in the `dmil_hf` schema, aligned with the split's rows.

    Args:
        split (`datasets.Dataset`): one split (columns `text`, `image`, `audio` + `audio_sampling_rate`,
            `<name>_features`).
        modalities (`Sequence[str]`): at least two modality names (`text`, `vision`, `audio`, feature names).
        model (*optional*): a DMIL or baseline model; its modalities use the projected tower embeddings.
        processor (*optional*): the model's processor (needed for its text / vision / audio modalities).
        dims (`int`): output width of the default text / image / audio reductions.
        seed (`int`): random state of the reductions.
    """
    return modality_arrays_with_info(split, modalities, model, processor, dims=dims, seed=seed,
                                     batch_size=batch_size)[0]


__all__ = ["audio_matrix", "default_matrix", "feature_matrix", "image_matrix", "log_mel_summary", "modality_arrays",
           "modality_arrays_with_info", "model_embeddings", "text_matrix"]
