"""Where a partly noised modality is lost: accuracy per interaction type of a trained model on a split with
modality M partly noised at LEVEL (`dmil_hf.data.degrade`, `partial`), predicted as the model does (marginalised over
which modalities work), with M's reliability forced to 1 (its reliability head's last layer set to a constant 40),
with M declared missing, and on the clean split. Round 11, on round 10's `synthetic`, `synthetic3` and
`digits-pretrained` bench runs.

    python benchmarks/robustness/round11/partial_paths.py RUN CONFIGURATION M LEVEL SPLIT
"""
import sys, copy, numpy as np, torch
from transformers import AutoProcessor
from dmil_hf.bench import CONFIGURATIONS
from dmil_hf.data import load_dataset_from_name_or_path
from dmil_hf.data.degrade import degrade_split
from dmil_hf.experiment import evaluate_model
from dmil_hf.loading import load_model
run, cfg, m, level, split = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
name, kw = CONFIGURATIONS[cfg]; dsd = load_dataset_from_name_or_path(name, **kw)
base = load_model(run).eval()
processor = AutoProcessor.from_pretrained(run) if any(base.config.tower_config(x) for x in base.config.modalities) else None
deg = degrade_split(dsd[split], m, "partial", level=level) if level < 1 else degrade_split(dsd[split], m, "noise")
it = np.asarray(deg["interaction"]); y = np.asarray(deg["labels"])
def acc(model, data):
    rep, pred = evaluate_model(model, processor, data)
    ok = pred["logits"].argmax(1) == y
    rel = pred.get("modality_reliability")
    return ok, rel
def show(tag, ok, rel=None):
    r = "" if rel is None else f" rel_{m} mean {np.asarray(rel)[:, list(base.config.modalities).index(m)].mean():.2f}"
    print(f"{tag:10s} acc {100*ok.mean():.1f} " + " ".join(f"{t}:{100*ok[it==t].mean():.0f}" for t in np.unique(it)) + r, flush=True)
ok, rel = acc(base, deg); show("marginal", ok, rel)
forced = copy.deepcopy(base)
with torch.no_grad():
    head = forced.dmil.reliability.heads[m]; head[-1].weight.zero_(); head[-1].bias.fill_(40.0)
ok, _ = acc(forced, deg); show("trust m", ok)
ok, _ = acc(base, degrade_split(deg, m, "missing")); show("m missing", ok)
ok, _ = acc(base, dsd[split]); show("clean", ok)
