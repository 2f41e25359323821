"""Two feature datasets unlike dmil_hf's built-in `synthetic`, in the documented user-dataset format.

Differences from `dmil_hf.data.synthetic`:
- modalities of different widths and names (not a/b/c, not one shared width);
- features are a fixed random 2-layer tanh MLP (per modality) of discrete latents, not a rotation of
  [type code, value code]; plus a per-modality nuisance "session" latent (3 states, label-irrelevant) that makes each
  class-conditional distribution multimodal;
- no clean per-modality type code: each modality only carries a weak *role* cue (carrier / distractor / synergy part),
  so the interaction type is only partly recoverable, and only jointly from the modalities;
- interaction types are drawn i.i.d. per sample from a mixture (counts vary), not exact counts;
- A: synergy lives on the 2nd and 3rd modalities (not the first two) and the 1st carries a distractor on synergy rows;
- B: imbalanced labels (distractor values drawn from the same label prior, so they carry nothing about the label),
  heavier noise.

Label information sits only where the type says: redundancy -> every modality shows y; unique_m -> m shows y, the
others show independent distractor values; synergy -> modality i shows u ~ uniform, j shows (y - u) mod K, so each
alone is independent of y; any other modality shows a distractor.

The generative model has discrete latents + isotropic Gaussian noise, so the exact Bayes posterior is computable
(sum over type, hidden values and nuisance states). The script writes the Bayes accuracy (overall, per type, and with
each modality missing) to $UNSEEN_DIR/<X>_bayes.json (default /tmp/unseen; the datasets go to $UNSEEN_DIR/A and B).
It is NOT stored in the dataset's metadata: the documented user path has none.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, Sequence, Value

OUT = Path(os.environ.get("UNSEEN_DIR", "/tmp/unseen"))
ROLES = ("carrier", "distractor", "synergy")
NUISANCE_STATES = 3


def logsumexp(x, axis):
    top = np.max(x, axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


class Generator:
    def __init__(self, widths: dict, num_classes: int, mixture: dict, synergy_pair: tuple, noise: float,
                 label_prior=None, role_norm=1.0, value_norm=2.5, nuisance_norm=1.5, hidden=48, seed=0):
        rng = np.random.default_rng(seed)
        self.names = list(widths)
        self.widths = widths
        self.K = num_classes
        self.types = ["redundancy"] + [f"unique_{m}" for m in self.names] + ["synergy"]
        total = sum(mixture.values())
        self.mixture = np.array([mixture.get(t, 0.0) / total for t in self.types])
        self.pair = tuple(self.names.index(m) for m in synergy_pair)
        self.noise = noise
        self.prior = np.full(num_classes, 1.0 / num_classes) if label_prior is None else np.asarray(label_prior, float)
        self.prior = self.prior / self.prior.sum()

        def emb(count, dim, norm):
            e = rng.normal(size=(count, dim))
            return norm * e / np.linalg.norm(e, axis=1, keepdims=True)

        # Per modality: embeddings of role / value / nuisance, then a fixed random MLP with tanh; the table of the
        # noiseless output of every (role, value, nuisance) combination (3 * K * S rows), standardised.
        self.tables = []
        for m in self.names:
            r, v, s = emb(len(ROLES), 4, role_norm), emb(num_classes, 8, value_norm), emb(NUISANCE_STATES, 4, nuisance_norm)
            z = np.concatenate([np.repeat(r, num_classes * NUISANCE_STATES, 0),
                                np.tile(np.repeat(v, NUISANCE_STATES, 0), (len(ROLES), 1)),
                                np.tile(s, (len(ROLES) * num_classes, 1))], axis=1)
            w1 = rng.normal(size=(z.shape[1], hidden)) / np.sqrt(z.shape[1]) * 1.5
            b1 = rng.normal(size=hidden) * 0.3
            w2 = rng.normal(size=(hidden, widths[m])) / np.sqrt(hidden)
            out = np.tanh(z @ w1 + b1) @ w2
            out = (out - out.mean(0)) / out.std(0).mean()  # signal variance ~1 per dim on average
            self.tables.append(out.reshape(len(ROLES), num_classes, NUISANCE_STATES, widths[m]))

    def sample(self, n, rng, types=None):
        types = rng.choice(len(self.types), size=n, p=self.mixture) if types is None else types
        y = rng.choice(self.K, size=n, p=self.prior)
        M = len(self.names)
        roles = np.full((n, M), 1)  # distractor
        values = rng.choice(self.K, size=(n, M), p=self.prior)  # distractor values: the label's marginal
        red = types == 0
        roles[red] = 0
        values[red] = y[red, None]
        for m in range(M):
            u = types == 1 + m
            roles[u, m] = 0
            values[u, m] = y[u]
        syn = types == M + 1
        i, j = self.pair
        uu = rng.integers(0, self.K, syn.sum())
        roles[syn, i] = roles[syn, j] = 2
        values[syn, i] = uu
        values[syn, j] = (y[syn] - uu) % self.K
        nuis = rng.integers(0, NUISANCE_STATES, (n, M))
        xs = []
        for m in range(M):
            clean = self.tables[m][roles[:, m], values[:, m], nuis[:, m]]
            xs.append((clean + self.noise * rng.normal(size=clean.shape)).astype(np.float32))
        return xs, y, types

    def log_posterior(self, xs, present=None):
        """log p(y | present modalities), up to a constant: exact under the generative model."""
        M, K = len(self.names), self.K
        present = range(M) if present is None else present
        n = len(xs[0])
        # ll[m][n, role, value]: log-likelihood, nuisance summed out; absent modality: zeros (flat)
        ll = [np.zeros((n, len(ROLES), K)) for _ in range(M)]
        for m in present:
            table = self.tables[m].reshape(-1, self.tables[m].shape[-1])
            x = xs[m].astype(np.float64)
            d2 = (x ** 2).sum(1, keepdims=True) - 2 * x @ table.T + (table ** 2).sum(1)[None]
            l = (-d2 / (2 * self.noise ** 2)).reshape(n, len(ROLES), K, NUISANCE_STATES)
            ll[m] = logsumexp(l, axis=3) - np.log(NUISANCE_STATES)
        logp = np.log(self.prior)
        distract = [logsumexp(ll[m][:, 1, :] + logp[None], axis=1)[:, None] for m in range(M)]  # (n, 1)
        per_type = [sum(ll[m][:, 0, :] for m in range(M))]
        for k in range(M):
            per_type.append(ll[k][:, 0, :] + sum(distract[m] for m in range(M) if m != k))
        i, j = self.pair
        u = np.arange(K)
        pair = ll[i][:, 2, :][:, None, :] + ll[j][:, 2, :][:, (u[:, None] - u[None, :]) % K]  # (n, y, u)
        per_type.append(logsumexp(pair, axis=2) - np.log(K) + sum(distract[m] for m in range(M) if m not in (i, j)))
        with np.errstate(divide="ignore"):
            lmix = np.log(self.mixture)
        joint = np.stack(per_type, 1) + lmix[None, :, None] + logp[None, None, :]
        return logsumexp(joint, axis=1)

    def bayes(self, xs, y, types):
        def acc(present=None):
            pred = self.log_posterior(xs, present).argmax(1)
            ok = pred == y
            return {"overall": float(ok.mean()),
                    **{t: float(ok[types == k].mean()) for k, t in enumerate(self.types) if (types == k).any()}}
        out = {"all": acc()}
        for m, name in enumerate(self.names):
            out[f"missing_{name}"] = acc([k for k in range(len(self.names)) if k != m])
        return out


def build(gen: Generator, sizes=(6000, 1000, 1000), seed=0):
    rng = np.random.default_rng(seed + 1000)
    n = sum(sizes)
    xs, y, types = gen.sample(n, rng)
    features = Features({"labels": Value("int64"), "interaction": Value("string"),
                         **{f"{m}_features": Sequence(Value("float32")) for m in gen.names}})
    bounds = np.cumsum((0,) + sizes)
    splits, bayes = {}, {}
    for name, a, b in zip(("train", "validation", "test"), bounds[:-1], bounds[1:]):
        cols = {"labels": y[a:b].tolist(), "interaction": [gen.types[t] for t in types[a:b]]}
        for m, x in zip(gen.names, xs):
            cols[f"{m}_features"] = list(x[a:b])
        splits[name] = Dataset.from_dict(cols, features=features)
        bayes[name] = gen.bayes([x[a:b] for x in xs], y[a:b], types[a:b])
    # Monte Carlo Bayes on a large fresh sample per type
    mc = {}
    for k, t in enumerate(gen.types):
        if gen.mixture[k] == 0:
            continue
        xs2, y2, t2 = gen.sample(20000, np.random.default_rng(seed + 7 + k), types=np.full(20000, k))
        for key, by in gen.bayes(xs2, y2, t2).items():
            mc.setdefault(key, {})[t] = by[t]
    for key, by in mc.items():
        by["overall"] = float(sum(gen.mixture[gen.types.index(t)] * a for t, a in by.items()))
    return DatasetDict(splits), {"bayes_monte_carlo": mc, "bayes_on_split": bayes,
                                 "mixture": dict(zip(gen.types, gen.mixture.tolist())),
                                 "label_prior": gen.prior.tolist(), "noise": gen.noise,
                                 "synergy_pair": [gen.names[i] for i in gen.pair], "widths": gen.widths,
                                 "split_type_counts": {s: {t: int(c) for t, c in zip(*np.unique(
                                     [gen.types[i] for i in types[a:b]], return_counts=True))}
                                     for s, a, b in zip(("train", "validation", "test"), bounds[:-1], bounds[1:])},
                                 "split_label_counts": {s: np.bincount(y[a:b], minlength=gen.K).tolist()
                                                        for s, a, b in zip(("train", "validation", "test"),
                                                                           bounds[:-1], bounds[1:])}}


CONFIGS = {
    "A": dict(widths={"accel": 16, "depth": 32, "gaze": 12}, num_classes=6,
              mixture={"redundancy": 0.25, "unique_accel": 0.15, "unique_depth": 0.15, "unique_gaze": 0.15,
                       "synergy": 0.30},
              synergy_pair=("depth", "gaze"), noise=0.5, role_norm=1.0, seed=11),
    "B": dict(widths={"ecg": 20, "eye": 40}, num_classes=4,
              mixture={"redundancy": 0.15, "unique_ecg": 0.30, "unique_eye": 0.15, "synergy": 0.40},
              synergy_pair=("ecg", "eye"), noise=1.5, label_prior=[0.35, 0.30, 0.20, 0.15], role_norm=1.0,
              seed=22),
}


def main():
    from dmil_hf.data import inspect_dataset

    names = sys.argv[1:] or list(CONFIGS)
    for name in names:
        gen = Generator(**CONFIGS[name])
        dsd, info = build(gen, seed=CONFIGS[name]["seed"])
        path = OUT / name
        dsd.save_to_disk(str(path))
        from datasets import load_from_disk
        schema = inspect_dataset(load_from_disk(str(path)))
        info["inspect_dataset"] = repr(schema)
        (OUT / f"{name}_bayes.json").write_text(json.dumps(info, indent=2))
        print(name, schema)
        print(json.dumps({"mc": info["bayes_monte_carlo"], "test": info["bayes_on_split"]["test"]}, indent=1))


if __name__ == "__main__":
    main()
