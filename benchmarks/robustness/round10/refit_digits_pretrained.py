"""Refit a trained `digits-pretrained` model's reliability heads after the fact, as `dmil train` does after the last
stage (`dmil_hf.training.refit_reliability_heads`), on a corrupted copy of the training split with SHARE of the rows
per modality (default: the stages' share, 0.15), with the config fields in OVERRIDES (JSON); then accuracy on the
validation and test splits, clean and with the text or the audio degraded. Round 10's post-hoc measurements (run on
round 9's models of `make run`'s command, seeds 0-2, at the commit before round 10: 'level' and 'responsibility' are
`reliability_partial_target`).

    python benchmarks/robustness/round10/refit_digits_pretrained.py RUN MODALITIES STEPS [OVERRIDES [SHARE]] [--before]
"""
import sys, json, tempfile, numpy as np, torch
from transformers import AutoProcessor, TrainingArguments
from dmil_hf.data import add_training_corruption, inspect_dataset, load_dataset_from_name_or_path
from dmil_hf.data.degrade import degrade_split
from dmil_hf.experiment import evaluate_model
from dmil_hf.loading import load_model
from dmil_hf.methods import METHODS
from dmil_hf.preprocess import encode_dataset
from dmil_hf.training import refit_reliability_heads
run, mods_arg, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
share = float(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] != "--before" else None
model = load_model(run).eval(); proc = AutoProcessor.from_pretrained(run)
dsd = load_dataset_from_name_or_path("digits")
SETS = [("text", "noise"), ("text", "missing"), ("text", "partial"), ("audio", "noise"), ("audio", "partial")]
cache = {}
def measure(tag):
    out = []
    for split in ("validation", "test"):
        res = [f"clean {100*evaluate_model(model, proc, dsd[split])[0]['accuracy']:.1f}"]
        for m, k in SETS:
            key = (split, m, k)
            if key not in cache:
                cache[key] = degrade_split(dsd[split], m, k, level=0.75 if k == "partial" else None)
            res.append(f"{k[:5]}_{m[:2]} {100*evaluate_model(model, proc, cache[key])[0]['accuracy']:.1f}")
        out.append(split[:4] + " " + " ".join(res))
    print(f"{tag:12s} " + " | ".join(out), flush=True)
if "--before" in sys.argv: measure("as trained")
for k, v in overrides.items(): setattr(model.config, k, v)
if "reliability_dropout" in overrides: model.dmil.reliability.input_dropout.p = overrides["reliability_dropout"]
modalities = inspect_dataset(dsd).modalities
train = add_training_corruption(dsd["train"], modalities, share if share else METHODS["dmil"].train_corruption, seed=0)
encoded = encode_dataset(dsd, proc, modalities, train=train)
model.config.reliability_refit_steps = steps; model.config.reliability_refit_modalities = mods_arg.split(",")
with tempfile.TemporaryDirectory() as folder:
    args = TrainingArguments(output_dir=folder, per_device_train_batch_size=64, seed=0, report_to="none", disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0)
    rec = refit_reliability_heads(model, args, encoded["train"], encoded["validation"])
print(f"refit {rec['steps']} steps {rec['train_seconds']:.1f}s loss {rec['first_loss']:.3f}->{rec['last_loss']:.3f}", flush=True)
measure(f"refit {mods_arg} {overrides} {share}")
