"""Readout match (the largest `interaction_weights` entry is the true type's component, %) and accuracy on the validation
and test splits of `digits`, for trained runs (Round 10: round 9's and round 10's `make run` models).

    python benchmarks/robustness/round10/readout_by_split.py RUN [RUN ...]
"""
import sys, numpy as np, torch
from transformers import AutoProcessor
from dmil_hf.loading import load_model
from dmil_hf.data import load_dataset_from_name_or_path
from dmil_hf.preprocess import encode_split
ds = load_dataset_from_name_or_path("digits")
for run in sys.argv[1:]:
    model = load_model(run).eval(); proc = AutoProcessor.from_pretrained(run)
    names = list(model.config.component_names); out = []
    for split in ("validation", "test"):
        sp = ds[split]; enc = encode_split(sp, proc, list(model.config.modalities)).with_format("torch"); w = []; p = []
        with torch.no_grad():
            for i in range(0, len(enc), 64):
                b = enc[i:i + 64]; b.pop("labels", None); b.pop("interaction", None); o = model(**b); w.append(o.interaction_weights); p.append(o.logits.argmax(-1))
        w = torch.cat(w).numpy(); it = np.asarray(sp["interaction"]); match = np.array([names[j] for j in w.argmax(1)]) == it
        out.append(f"{split[:4]} acc {100*(torch.cat(p).numpy()==np.asarray(sp['labels'])).mean():.1f} readout {100*match.mean():.1f} " + " ".join(f"{t[:8]}:{100*match[it==t].mean():.0f}" for t in np.unique(it)))
    print(run.split("/")[-1], " | ".join(out), flush=True)
