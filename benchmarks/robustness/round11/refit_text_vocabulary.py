"""Refit a trained `digits-pretrained` model's reliability heads after the fact, as `dmil train` does after the last
stage with round 10's defaults (half the rows copied per modality and corrupted, text and audio heads), with the copy's
text noise drawn from the training split's words (`today`, what `dmil_hf.data.degrade` does) or each word with
probability 1/2 from a broad vocabulary (`broad`: the whole words of the model's MiniLM tokenizer); then validation
and test: clean accuracy, readout, noised and missing text, three quarters of the audio noised. Round 11, on round 9's
`make run` models (which had no refit over frozen towers).

    python benchmarks/robustness/round11/refit_text_vocabulary.py RUN today|broad|asis [MODALITIES [SHARE]]

`asis`: the model as trained, no refit. MODALITIES (default `text,audio`): the heads refitted; SHARE (default 0.5):
the copy's share of corrupted rows per modality. Also run on round 7's `digits` models (tiny towers, which `dmil
train` does not refit): `refit-digits.txt`. (The `digits-pretrained` lines of `refit-text-vocabulary.txt` were printed
before the vision and blank-audio columns were added.)
"""
import sys, copy, tempfile, numpy as np, torch
from transformers import AutoProcessor, TrainingArguments
import dmil_hf.data.degrade as dg
from dmil_hf.data import add_training_corruption, inspect_dataset, load_dataset_from_name_or_path
from dmil_hf.data.degrade import degrade_split
from dmil_hf.experiment import evaluate_model
from dmil_hf.loading import load_model
from dmil_hf.preprocess import encode_dataset
from dmil_hf.training import refit_reliability_heads
run, mode = sys.argv[1], sys.argv[2]
mods = sys.argv[3].split(",") if len(sys.argv) > 3 else ["text", "audio"]
share = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
base = load_model(run).eval(); proc = AutoProcessor.from_pretrained(run)
dsd = load_dataset_from_name_or_path("digits")
broad = sorted(w for w in proc.tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 3)
orig = dg._degrade_text
def broad_text(text, degradation, rng, vocabulary):
    if degradation.kind != "noise":
        return orig(text, degradation, rng, vocabulary)
    words = text.split()
    return " ".join(str(rng.choice(broad)) if rng.random() < 0.5 else str(rng.choice(vocabulary)) for _ in range(max(1, len(words))))
SETS = [("text", "noise", None), ("text", "missing", None), ("vision", "noise", None), ("vision", "missing", None),
        ("audio", "blank", None), ("audio", "partial", 0.75)]
names = np.asarray(base.config.component_names)
cache = {}
def measure(model, tag):
    out = []
    for split in ("validation", "test"):
        rep, pred = evaluate_model(model, proc, dsd[split])
        it = np.asarray(dsd[split]["interaction"])
        ro = (names[pred["interaction_weights"].argmax(1)] == it).mean()
        res = [f"clean {100*rep['accuracy']:.1f} readout {100*ro:.1f}"]
        for m, k, l in SETS:
            key = (split, m, k)
            if key not in cache:
                cache[key] = degrade_split(dsd[split], m, k, level=l)
            res.append(f"{k[:5]}_{m[:2]} {100*evaluate_model(model, proc, cache[key])[0]['accuracy']:.1f}")
        out.append(split[:4] + " " + " ".join(res))
    print(f"{run.split('/')[-1]} {tag:8s} " + " | ".join(out), flush=True)
modalities = inspect_dataset(dsd).modalities
if mode == "asis":
    measure(base, "asis")
    sys.exit()
if mode == "broad":
    dg._degrade_text = broad_text
train = add_training_corruption(dsd["train"], modalities, share, seed=0)
dg._degrade_text = orig
print(run, mode, "sample noised texts:", [t for t, c in zip(train["text"][-4000:], train["modality_corruption"][-4000:]) if c[0] == 1][:5], flush=True)
encoded = encode_dataset(dsd, proc, modalities, train=train)
model = copy.deepcopy(base)
model.config.reliability_refit_steps = 3000; model.config.reliability_refit_modalities = mods
with tempfile.TemporaryDirectory() as folder:
    args = TrainingArguments(output_dir=folder, per_device_train_batch_size=64, seed=0, report_to="none", disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0)
    refit_reliability_heads(model, args, encoded["train"], encoded["validation"])
measure(model.eval(), mode if mods == ["text", "audio"] and share == 0.5 else f"{mode} {','.join(mods)} {share}")
