"""Round 6 cost: a stage-3 DMIL training step (batch 64, feature modalities of width 24) with the default share of
corrupted rows, reliability_partial_target "level" against "responsibility", the two taking turns step by step.
Usage: OMP_NUM_THREADS=1 python benchmarks/robustness/round6/step_cost.py"""
import time, torch, statistics
from dmil_hf import DmilConfig, DmilForMultimodalClassification
torch.set_num_threads(1)
def build(target, mods):
    torch.manual_seed(0)
    cfg = DmilConfig(feature_modalities={m: 24 for m in mods}, num_labels=4, reliability_partial_target=target, modality_dropout=0.0)
    model = DmilForMultimodalClassification(cfg).train(); model.set_training_stage(3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt
g = torch.Generator().manual_seed(0)
for mods in (("a", "b"), ("a", "b", "c")):
    B = 64
    inputs = {f"{m}_features": torch.randn(B, 24, generator=g) for m in mods}
    labels = torch.randint(0, 4, (B,), generator=g)
    corruption = torch.zeros(B, len(mods))
    for i in range(len(mods)):  # ~ the default draws: per modality 10% corrupted, half of them partly
        corruption[i * 6:(i * 6) + 3, i] = 0.4
        corruption[i * 6 + 3:(i * 6) + 6, i] = 1.0
    models = {t: build(t, mods) for t in ("level", "responsibility")}
    times = {t: [] for t in models}
    for step in range(160):
        for t, (model, opt) in models.items():
            t0 = time.perf_counter()
            loss = model(**inputs, labels=labels, modality_corruption=corruption).loss
            opt.zero_grad(); loss.backward(); opt.step()
            if step >= 10: times[t].append(time.perf_counter() - t0)
    med = {t: 1000 * statistics.median(v) for t, v in times.items()}
    print(len(mods), "modalities, partial rows", int(((corruption > 0) & (corruption < 1)).any(1).sum()), "of", B, {t: round(v, 2) for t, v in med.items()}, "ratio %.3f" % (med["responsibility"] / med["level"]))
