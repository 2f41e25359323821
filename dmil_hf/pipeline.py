"""The `multimodal-classification` pipeline: raw text / images / audio / feature vectors in, labels and the
per-sample interaction weights out.

Example:
```python
>>> import dmil_hf  # registers the task
>>> from transformers import pipeline
>>> classifier = pipeline("multimodal-classification", model="runs/dmil-digits")
>>> classifier({"text": "seven", "image": "digit.png"}, top_k=2)
{'scores': [{'label': '7', 'score': 0.91}, {'label': '1', 'score': 0.04}],
 'interaction_weights': {'redundancy': 0.62, 'unique_text': 0.11, 'unique_vision': 0.2, 'synergy': 0.07},
 'modality_reliability': {'text': 0.99, 'vision': 0.98}}
```
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import Pipeline

from .configuration_dmil import TOWERS

TASK = "multimodal-classification"


class MultimodalClassificationPipeline(Pipeline):
    r"""
    Classifies samples given as dicts with any of `text` (a string), `image` (a PIL image, an array or a file path),
    `audio` (a 1-D array with `sampling_rate` in the sample or the call, a `{"array", "sampling_rate"}` dict as
    `datasets` gives, or a file path) and `<name>_features` (a vector, or a `(time, width)` array) for each feature
    modality of the model. Modalities left out are absent: the model uses only the components the present ones
    support.

    Returns, per sample, `{"scores": [{"label", "score"}, ...] (highest first, `top_k` of them), "interaction_weights":
    {component: weight}, "modality_reliability": {modality: reliability}}` (the per-sample interaction readout and,
    for DMIL, how far each modality given can be trusted, in [0, 1]: near 0 it is treated as missing; only for models
    that have them; regression models give `{"value": float, ...}`). Multi-label models
    (`problem_type="multi_label_classification"`) score each label on its own (sigmoid), and add `"labels"`: every
    label whose score is above 0.5, highest first.
    A single dict gives a single result, a list of dicts a list. `batch_size` batches samples that have the same
    modalities.
    """

    # The DmilProcessor holds the tokenizer / image processor / feature extractor; a feature-only model has none.
    _load_processor = None
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model.eval()  # DMIL's bottlenecks sample in training mode; predictions use their means
        # from_pretrained re-initialises tensors a checkpoint lacks and only logs it: refuse such a model here.
        source = getattr(self.model, "name_or_path", None) or getattr(self.model.config, "_name_or_path", None)
        if isinstance(source, str) and os.path.isdir(source):
            from .loading import check_complete

            check_complete(self.model, source)

    def _sanitize_parameters(self, top_k=None, sampling_rate=None, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; expected top_k, sampling_rate, batch_size.")
        preprocess, postprocess = {}, {}
        if sampling_rate is not None:
            preprocess["sampling_rate"] = sampling_rate
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer; got {top_k!r}.")
            postprocess["top_k"] = top_k
        return preprocess, {}, postprocess

    def __call__(self, inputs, batch_size: int | None = None, **kwargs):
        """
        Args:
            inputs (`dict` or list of `dict`): the samples (see the class docstring).
            top_k (`int`, *optional*): how many labels to return per sample (default: all, highest first).
            sampling_rate (`int`, *optional*): rate of audio arrays given without their own `sampling_rate`.
            batch_size (`int`, *optional*, defaults to 1): samples per forward pass.
        """
        single = isinstance(inputs, dict)
        samples = [inputs] if single else list(inputs)
        for index, sample in enumerate(samples):
            if not isinstance(sample, dict):
                raise TypeError(f"sample {index} is a {type(sample).__name__}; expected a dict with any of "
                                f"{self.expected_keys()}.")
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        forward_params = {**self._forward_params, **forward_params}
        postprocess_params = {**self._postprocess_params, **postprocess_params}
        batch_size = batch_size or self._batch_size or 1

        results = [None] * len(samples)
        for indices in _batches(samples, batch_size):
            model_inputs = self.preprocess([samples[i] for i in indices], **preprocess_params)
            outputs = self.postprocess(self.forward(model_inputs, **forward_params), **postprocess_params)
            for i, output in zip(indices, outputs):
                results[i] = output
        return results[0] if single else results

    def expected_keys(self) -> list[str]:
        modalities = self.model.config.modalities
        keys = [tower.column for name, tower in TOWERS.items() if name in modalities]
        keys += [f"{m}_features" for m in modalities if m in self.model.config.feature_modalities]
        return keys + (["sampling_rate"] if "audio" in modalities else [])

    def preprocess(self, samples, sampling_rate=None):
        """One sample (a dict) or several with the same keys -> the model's prefixed input tensors."""
        samples = [samples] if isinstance(samples, dict) else list(samples)
        config = self.model.config
        allowed = set(self.expected_keys())
        for sample in samples:
            unknown = set(sample) - allowed
            if unknown:
                raise ValueError(f"unknown or unsupported keys {sorted(unknown)}; this model "
                                 f"({', '.join(config.modalities)}) takes {sorted(allowed)}.")
        present = [tower.column for tower in TOWERS.values() if tower.column in samples[0]]
        feature_keys = [key for key in samples[0] if key.endswith("_features")]
        if not present and not feature_keys:
            raise ValueError(f"a sample holds no modality; give at least one of {sorted(allowed - {'sampling_rate'})}.")

        call = {}
        if "text" in present:
            call["text"] = [sample["text"] for sample in samples]
        if "image" in present:
            call["images"] = [_image(sample["image"]) for sample in samples]
        if "audio" in present:
            clips, rates = zip(*(_audio(sample, sampling_rate) for sample in samples))
            # Files carry their own rate; every array in one call must share one.
            array_rates = {rate for clip, rate in zip(clips, rates) if not isinstance(clip, (str, os.PathLike))}
            if len(array_rates) > 1:
                raise ValueError(
                    f"samples batched together have different sampling rates {sorted(array_rates, key=str)}.")
            call["audio"] = list(clips)
            rate = next(iter(array_rates), None)
            if rate is not None:
                call["sampling_rate"] = rate
            elif array_rates:
                raise ValueError("audio was given as an array without a sampling rate; add 'sampling_rate' to the "
                                 "sample, pass {'array': ..., 'sampling_rate': ...}, or call the pipeline with "
                                 "sampling_rate=.")
        model_inputs = {}
        if call:
            if self.processor is None:
                raise ValueError(f"this model has no processor saved with it, so it cannot read {sorted(present)}; "
                                 "save a DmilProcessor next to the model (processor.save_pretrained(model_dir)).")
            model_inputs.update(self.processor(**call, return_tensors="pt"))
        for key in feature_keys:
            name = key[: -len("_features")]
            width = config.feature_modalities[name]
            arrays = [np.asarray(sample[key].detach().cpu() if isinstance(sample[key], torch.Tensor) else sample[key],
                                 dtype=np.float32) for sample in samples]
            for array in arrays:
                if array.ndim not in (1, 2) or array.shape[-1] != width:
                    raise ValueError(f"{key} has shape {array.shape}; expected ({width},) or (time, {width}).")
            model_inputs[key] = torch.from_numpy(np.stack(arrays))
        return model_inputs

    def _forward(self, model_inputs):
        outputs = self.model(**model_inputs)
        result = {"logits": outputs.logits}
        for key in ("interaction_weights", "modality_reliability", "modality_mask"):
            if getattr(outputs, key, None) is not None:
                result[key] = getattr(outputs, key)
        return result

    def postprocess(self, model_outputs, top_k=None):
        config = self.model.config
        logits = model_outputs["logits"].float()
        weights = model_outputs.get("interaction_weights")
        results = []
        for row in range(logits.shape[0]):
            if config.problem_type == "regression":
                result = {"value": float(logits[row, 0])}
            else:
                multi_label = config.problem_type == "multi_label_classification"
                probabilities = logits[row].sigmoid() if multi_label else logits[row].softmax(-1)
                order = probabilities.argsort(descending=True)
                names = [config.id2label.get(int(i), str(int(i))) for i in order]
                result = {"scores": [{"label": name, "score": float(probabilities[i])}
                                     for name, i in zip(names, order[: top_k or len(probabilities)])]}
                if multi_label:
                    result["labels"] = [name for name, i in zip(names, order) if probabilities[i] > 0.5]
            if weights is not None:
                result["interaction_weights"] = dict(zip(config.component_names, weights[row].float().tolist()))
            reliability = model_outputs.get("modality_reliability")
            if reliability is not None:
                present = model_outputs["modality_mask"][row].tolist()
                result["modality_reliability"] = {m: float(r) for m, r, p in zip(
                    config.modalities, reliability[row].float().tolist(), present) if p}
            results.append(result)
        return results


def _batches(samples, batch_size: int):
    """Indices of samples grouped by their keys (in order of first appearance), in chunks of `batch_size`."""
    groups: dict[tuple, list[int]] = {}
    for index, sample in enumerate(samples):
        audio = sample.get("audio")
        rate = audio.get("sampling_rate") if isinstance(audio, dict) else sample.get("sampling_rate")
        groups.setdefault((tuple(sorted(sample)), rate), []).append(index)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start:start + batch_size]


def _image(image):
    if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
        raise ValueError(f"image: no file at {os.fspath(image)!r}.")
    return image


def _audio(sample, sampling_rate):
    """(clip, rate) from a sample: a path (its rate comes from the file), an array, or a {"array", "sampling_rate"}."""
    audio = sample["audio"]
    if isinstance(audio, dict):
        if "array" not in audio:
            raise ValueError(f"audio dict has keys {sorted(audio)}; expected 'array' and 'sampling_rate'.")
        return audio["array"], audio.get("sampling_rate", sample.get("sampling_rate", sampling_rate))
    if isinstance(audio, (str, os.PathLike)):
        if not os.path.isfile(audio):
            raise ValueError(f"audio: no file at {os.fspath(audio)!r}.")
        return audio, None
    return audio, sample.get("sampling_rate", sampling_rate)


def register_pipeline() -> None:
    """Register the `multimodal-classification` task with transformers' `pipeline()` (idempotent)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.pipelines import PIPELINE_REGISTRY

    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is MultimodalClassificationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=MultimodalClassificationPipeline,
                                        pt_model=AutoModelForSequenceClassification)


__all__ = ["MultimodalClassificationPipeline", "TASK", "register_pipeline"]
