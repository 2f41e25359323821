"""`digits`: text, vision and audio built from real signals, with a known interaction type per sample.

Signals. vision: scikit-learn's `load_digits` handwritten 8 x 8 digits, upsampled bilinearly to `image_size` x
`image_size` (default 16, what the tiny ViT tower with 4 x 4 patches reads) and scaled to uint8 0..255. audio: the
words "zero".."nine" spoken by `espeak-ng` with 22 voice/speed/pitch settings (18 for train and validation, 4 for
test), resampled to 16 kHz, trimmed, placed at a random offset in a 1 s float32 clip with a random gain (0.5..1).
text: short sentences naming a digit in words, from varied templates.
Every image and clip gets Gaussian noise (`noise` x 255 per pixel; `noise` x 0.5, the speech peak, per audio sample).

Interaction types (label y in 0..9; "blank" = a modality with no digit: an empty canvas with faint speckles, a clip
of background noise only, or a sentence without a number):

- `redundancy`: the text names y, the image shows y, the voice says y.
- `unique_text` / `unique_vision` / `unique_audio`: that modality shows y; the other two are blank.
- `synergy`: the image shows u (uniform), the voice says v = (y - u) mod 10, and the text asks to add them (a
  sentence without a number): the label is (u + v) mod 10. Each modality alone is independent of y.

The type is recoverable from the inputs together (which modalities are blank, and the text's kind); a non-carrying
modality never depends on y. Bayes accuracy is computed exactly by enumerating the task at the symbol level (every
rendered digit assumed recognisable): 1.0 for every type with all modalities, and the optimum with each modality
missing (also the optimum for `noise_<m>` for an observer that knows the column is noise). A few of the
handwritten digits are ambiguous even to people, so the true optimum on vision-carried samples is slightly below 1.

Held out: train, validation and test images come from disjoint sklearn indices, and each split has its own voices
and text templates. Validation is held out the way test is (new speakers, new sentences, new handwriting), so model
selection and defaults chosen on it see the generalisation that the test split measures; it shares nothing with
test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

import numpy as np
from datasets import DatasetDict

from ..configuration_dmil import TOWER_MODALITIES
from ..pretrained import cache_root
from ..processing_dmil import resample_waveform
from ._build import assemble, mixture_shares, split_sizes, type_sequence

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INTERACTION_TYPES = ("redundancy", "unique_text", "unique_vision", "unique_audio", "synergy")
SAMPLING_RATE = 16000
CLIP_SECONDS = 1.0
INSTALL_HINT = "apt-get install -y --no-install-recommends espeak-ng"

# (voice+variant, words per minute, pitch 0..99); test voices are combinations never heard in train/validation.
TRAIN_VOICES = (
    ("en-us+m1", 150, 50), ("en-us+f2", 170, 60), ("en-gb+m3", 140, 40), ("en-gb+f3", 160, 70),
    ("en-gb-scotland+m2", 150, 45), ("en-gb-x-rp+f1", 155, 65), ("en-us+m4", 180, 35), ("en-gb+f4", 135, 55),
    ("en-gb-x-gbclan+m5", 165, 50), ("en-us+f5", 145, 75), ("en-gb-x-rp+m6", 175, 30), ("en-us-nyc+f1", 150, 60),
    ("en-gb-scotland+f2", 140, 58), ("en-us-nyc+m3", 160, 48), ("en-gb-x-gbclan+f4", 150, 72),
    ("en-gb-x-rp+m2", 145, 42), ("en-us+m7", 165, 55), ("en-gb+f1", 175, 62),
)
VALIDATION_VOICES = (("en-gb-x-gbclan+m1", 155, 38), ("en-us+m2", 160, 66), ("en-gb-scotland+m4", 170, 52),
                     ("en-us-nyc+f3", 140, 45))
TEST_VOICES = (("en-029+m3", 155, 55), ("en-gb-x-gbcwmd+f2", 145, 62), ("en-us-nyc+m7", 170, 42),
               ("en-gb-scotland+f5", 160, 68))
ALL_VOICES = TRAIN_VOICES + VALIDATION_VOICES + TEST_VOICES
# Text templates: {w} is the digit word. "blank" and "sum" sentences contain no number.
TEMPLATES = {
    "digit": {
        "train": ("the number is {w}", "i see the digit {w}", "{w} is the answer", "write down {w}",
                  "the code reads {w}", "my favourite number is {w}", "please type {w}", "we counted {w}"),
        "validation": ("the result is {w}", "he chose {w}", "look at number {w}"),
        "test": ("the answer is {w}", "she picked {w}", "it was number {w}"),
    },
    "blank": {
        "train": ("nothing to read here", "this line is empty", "no words about numbers", "the page says nothing",
                  "there is no note"),
        "validation": ("the sheet is empty", "no number appears here"),
        "test": ("nothing is written", "the card is blank"),
    },
    "sum": {
        "train": ("add the digit you see to the digit you hear", "sum the picture and the sound",
                  "what is the picture plus the voice", "combine both numbers by adding"),
        "validation": ("add what you see and what you hear", "the sum of the image and the voice"),
        "test": ("add the shown and the spoken numbers", "the total of both numbers"),
    },
}


def default_cache_dir() -> Path:
    return cache_root() / "espeak"


# -------------------------------------------------------------------- audio: espeak-ng clips, cached


def _clip_path(cache_dir: Path, word: str, voice: tuple) -> Path:
    name, speed, pitch = voice
    return cache_dir / f"{word}_{name}_s{speed}_p{pitch}.wav"


def _speak(executable: str, word: str, voice: tuple, path: Path) -> None:
    name, speed, pitch = voice
    fd, tmp = tempfile.mkstemp(suffix=".wav", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([executable, "-v", name, "-s", str(speed), "-p", str(pitch), "-w", tmp, word],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0 or os.path.getsize(tmp) == 0:
            raise RuntimeError(f"espeak-ng failed for {word!r} with voice {name}: {result.stderr.strip()}")
        os.replace(tmp, path)  # atomic: concurrent builders (e.g. two DDP processes) never read half a file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def synthesize_clips(voices, cache_dir=None, workers: int = 4) -> dict:
    """(word index, voice) -> trimmed, peak-normalised (0.5) float32 clip at 16 kHz; synthesises missing clips with
    espeak-ng into `cache_dir` (default `~/.cache/dmil_hf/espeak`, or `$DMIL_HF_CACHE/espeak`)."""
    import soundfile

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wanted = {(i, v): _clip_path(cache_dir, w, v) for (i, w), v in product(enumerate(DIGIT_WORDS), voices)}
    missing = [(key, path) for key, path in wanted.items() if not path.exists()]
    if missing:
        executable = shutil.which("espeak-ng")
        if executable is None:
            raise FileNotFoundError(
                f"the 'digits' dataset speaks its digits with espeak-ng, which is not installed ({len(missing)} clips "
                f"are not cached in {str(cache_dir)!r}). Install it with: {INSTALL_HINT}"
            )
        cache_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda item: _speak(executable, DIGIT_WORDS[item[0][0]], item[0][1], item[1]), missing))
    clips = {}
    for key, path in wanted.items():
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        data = data.mean(1)
        data = resample_waveform(data, rate, SAMPLING_RATE)
        loud = np.flatnonzero(np.abs(data) > 0.02 * np.abs(data).max())
        data = data[max(0, loud[0] - 160): loud[-1] + 160] if loud.size else data
        clips[key] = (0.5 * data / max(np.abs(data).max(), 1e-6)).astype(np.float32)
    return clips


# -------------------------------------------------------------------- the symbolic task and its Bayes accuracy


def _symbols(kind: str, y: int, u: int) -> dict:
    """What each modality shows: ('d', digit), ('blank',) or ('sum',)."""
    digit = ("d", y)
    if kind == "redundancy":
        return {"text": digit, "vision": digit, "audio": digit}
    if kind == "synergy":
        return {"text": ("sum",), "vision": ("d", u), "audio": ("d", (y - u) % 10)}
    carrier = kind[len("unique_"):]
    blank = {"text": ("blank",), "vision": ("blank",), "audio": ("blank",)}
    return {**blank, carrier: digit}


def symbolic_bayes_accuracy(shares: dict, present=TOWER_MODALITIES) -> dict:
    """Exact Bayes accuracy per type and overall when only the modalities in `present` are seen (ties split)."""
    states = [(k, y, u) for k in INTERACTION_TYPES if shares[k] > 0 for y in range(10) for u in range(10)]
    key = {s: tuple(_symbols(*s)[m] for m in present) for s in states}
    joint: dict = {}
    for s in states:
        scores = joint.setdefault(key[s], np.zeros(10))
        scores[s[1]] += shares[s[0]] / 100.0
    by_type = {}
    for kind in (k for k in INTERACTION_TYPES if shares[k] > 0):
        credit = 0.0
        for y, u in product(range(10), range(10)):
            scores = joint[key[(kind, y, u)]]
            best = np.flatnonzero(np.isclose(scores, scores.max()))
            credit += (y in best) / len(best)
        by_type[kind] = round(credit / 100.0, 6)
    return {"overall": round(sum(shares[k] * a for k, a in by_type.items()), 6), **by_type}


# -------------------------------------------------------------------- building


def _image_pools(rng, validation_fraction, test_fraction):
    """Upsampled images (n, 8, 8) in 0..16, labels, and disjoint stratified index pools per split."""
    from sklearn.datasets import load_digits

    images, targets = load_digits(return_X_y=True)
    pools = {"train": [], "validation": [], "test": []}
    for digit in range(10):
        indices = rng.permutation(np.flatnonzero(targets == digit))
        n_test, n_val = round(len(indices) * test_fraction), round(len(indices) * validation_fraction)
        pools["test"].append(indices[:n_test])
        pools["validation"].append(indices[n_test:n_test + n_val])
        pools["train"].append(indices[n_test + n_val:])
    by_class = {split: [pool[d] for d in range(10)] for split, pool in pools.items()}
    return images.reshape(-1, 8, 8), by_class


def _plan(split, n, shares, rng, image_pools):
    """Per sample: type, label, image index (-1 blank), spoken word (-1 blank) and voice, text."""
    voices = {"train": TRAIN_VOICES, "validation": VALIDATION_VOICES, "test": TEST_VOICES}[split]
    group = split
    kinds = np.array(INTERACTION_TYPES)[type_sequence(shares, n, rng)]
    labels = rng.integers(0, 10, n)
    plan = []
    for kind, y in zip(kinds, labels):
        u = int(rng.integers(0, 10))
        shown = _symbols(str(kind), int(y), u)
        image = audio = -1
        if shown["vision"][0] == "d":
            image = int(rng.choice(image_pools[split][shown["vision"][1]]))
        if shown["audio"][0] == "d":
            audio = shown["audio"][1]
        voice = voices[int(rng.integers(len(voices)))]
        text_kind = {"d": "digit", "blank": "blank", "sum": "sum"}[shown["text"][0]]
        templates = TEMPLATES[text_kind][group]
        template = templates[int(rng.integers(len(templates)))]
        text = template.format(w=DIGIT_WORDS[shown["text"][1]]) if text_kind == "digit" else template
        plan.append({"interaction": str(kind), "label": int(y), "image": image, "word": audio, "voice": voice,
                     "template": template, "text": text})
    return plan


def _render(plan, rng, images, clips, noise, image_size):
    from scipy.ndimage import zoom

    n = len(plan)
    canvases = np.empty((n, 8, 8))
    for i, sample in enumerate(plan):
        canvases[i] = images[sample["image"]] if sample["image"] >= 0 else rng.uniform(0, 3, (8, 8)) * (
            rng.random((8, 8)) < 0.15)
    pixels = zoom(canvases, (1, image_size / 8, image_size / 8), order=1) * (255.0 / 16.0)
    pixels = np.clip(np.rint(pixels + noise * 255.0 * rng.normal(size=pixels.shape)), 0, 255).astype(np.uint8)
    length = int(SAMPLING_RATE * CLIP_SECONDS)
    audio = (noise * 0.5 * rng.normal(size=(n, length))).astype(np.float32)
    for i, sample in enumerate(plan):
        if sample["word"] < 0:
            continue
        clip = clips[(sample["word"], sample["voice"])]
        if len(clip) > length:
            start = (len(clip) - length) // 2
            clip = clip[start:start + length]
        offset = int(rng.integers(0, length - len(clip) + 1))
        audio[i, offset:offset + len(clip)] += rng.uniform(0.5, 1.0) * clip
    return pixels, np.clip(audio, -1.0, 1.0)


def make_digits(num_samples: int = 4000, seed: int = 0, cache_dir=None, mixture: dict | None = None,
                noise: float = 0.05, image_size: int = 16, validation_fraction: float = 0.15,
                test_fraction: float = 0.15) -> DatasetDict:
    """
    The `digits` dataset (see the module docstring): columns `text`, `image` (uint8 `image_size` x `image_size`),
    `audio` (float32, 1 s at 16 kHz), `audio_sampling_rate`, `labels` (0..9) and `interaction`. `mixture` maps
    interaction types (`redundancy`, `unique_text`, `unique_vision`, `unique_audio`, `synergy`) to shares (default
    equal). espeak-ng clips are cached in `cache_dir` (default `~/.cache/dmil_hf/espeak`); with a warm cache
    espeak-ng is not needed. Deterministic in `seed` (and the espeak-ng version).
    """
    if not noise >= 0:
        raise ValueError(f"noise must be non-negative; got {noise}.")
    if int(image_size) < 8:
        raise ValueError(f"image_size must be at least 8; got {image_size}.")
    sizes = split_sizes(int(num_samples), validation_fraction, test_fraction)
    shares = mixture_shares(INTERACTION_TYPES, mixture)
    clips = synthesize_clips(ALL_VOICES, cache_dir)
    images, image_pools = _image_pools(np.random.default_rng([seed, 1]), validation_fraction, test_fraction)
    splits = {}
    for index, (split, size) in enumerate(zip(("train", "validation", "test"), sizes)):
        rng = np.random.default_rng([seed, 10 + index])
        plan = _plan(split, size, shares, rng, image_pools)
        pixels, audio = _render(plan, rng, images, clips, float(noise), int(image_size))
        splits[split] = {"text": [s["text"] for s in plan], "image": pixels, "audio": audio,
                         "audio_sampling_rate": np.full(size, SAMPLING_RATE, dtype=np.int64),
                         "labels": np.array([s["label"] for s in plan], dtype=np.int64),
                         "interaction": [s["interaction"] for s in plan]}
    degraded = {}
    for m in TOWER_MODALITIES:
        degraded[f"missing_{m}"] = degraded[f"noise_{m}"] = symbolic_bayes_accuracy(
            shares, tuple(x for x in TOWER_MODALITIES if x != m))
    metadata = {
        "name": "digits",
        "builder_kwargs": {"num_samples": int(num_samples), "seed": seed, "mixture": shares, "noise": float(noise),
                           "image_size": int(image_size), "validation_fraction": validation_fraction,
                           "test_fraction": test_fraction},
        "interaction_types": list(INTERACTION_TYPES),
        "mixture": shares,
        "label_names": [str(d) for d in range(10)],
        "bayes_accuracy": symbolic_bayes_accuracy(shares),
        "bayes_accuracy_degraded": degraded,
        "bayes_method": "exact enumeration of the symbolic task (every rendered digit assumed recognisable)",
        "held_out": {"train_voices": [list(v) for v in TRAIN_VOICES],
                     "validation_voices": [list(v) for v in VALIDATION_VOICES],
                     "test_voices": [list(v) for v in TEST_VOICES],
                     **{f"{split}_templates": {k: list(v[split]) for k, v in TEMPLATES.items()}
                        for split in ("train", "validation", "test")},
                     "images": "test, validation and train draw from disjoint sklearn load_digits indices"},
    }
    return assemble(splits, metadata)


__all__ = ["ALL_VOICES", "DIGIT_WORDS", "INTERACTION_TYPES", "TEMPLATES", "TEST_VOICES", "TRAIN_VOICES", "VALIDATION_VOICES", "make_digits",
           "symbolic_bayes_accuracy", "synthesize_clips"]
