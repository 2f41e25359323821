"""Turn benchmark results into `results.md` (tables + the targets, checked) and PNG plots."""

from __future__ import annotations

from pathlib import Path


def _fmt(stat, scale=100.0, digits=1):
    if not stat:
        return "–"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


# Target margins of the benchmark (points of accuracy; fractions of samples for the readout).
# DMIL must beat the best baseline by this much overall; 0 elsewhere.
OVERALL_MARGIN = {"digits": 2.0, "digits-pretrained": 2.0}
DEGRADATION_GAP = 2.0  # DMIL's degradation gap (attainable minus degraded accuracy) on every modality at most this
PARTIAL_TOLERANCE = 1.0  # with partial noise, DMIL at least the best baseline minus this
ROW_TOLERANCE = 1.0  # no interaction type or degraded set more than this below the best baseline on that row
BAYES_GAP = {"synthetic": 2.0}  # within this of the Bayes limit overall
READOUT_MATCH = 0.9  # the readout's largest weight names the true type on at least this share of test samples
READOUT_MATCH_CONFIGURATIONS = ("synthetic", "synthetic3", "digits", "digits-pretrained")


def check_targets(summary: dict) -> list[tuple[str, bool, str]]:
    """The benchmark targets, each with whether it holds and by how much."""
    checks = []
    for dataset, methods in summary.items():
        if "dmil" not in methods:
            continue
        dmil = methods["dmil"]
        baselines = {m: e for m, e in methods.items() if m != "dmil"}
        if baselines:
            best_name, best = max(baselines.items(), key=lambda kv: kv[1]["accuracy"]["mean"])
            margin = OVERALL_MARGIN.get(dataset, 0.0)
            gap = 100 * (dmil["accuracy"]["mean"] - best["accuracy"]["mean"])
            # Rounded before comparing: accuracies are sample fractions, and float noise must not flip a tie.
            gap = round(gap, 6)
            checks.append((f"{dataset}: DMIL ≥ best baseline ({best_name})" + (f" + {margin:g} points" if margin else "")
                           + " overall", gap >= margin, f"{gap:+.1f} points"))
            worst = []
            for group in ("by_interaction", "degraded"):
                for key, stat in dmil[group].items():
                    best_other = max((e[group][key]["mean"] for e in baselines.values() if e[group].get(key)), default=None)
                    if stat and best_other is not None:
                        worst.append((100 * (stat["mean"] - best_other), key))
            if worst:
                gap, key = min(worst)
                gap = round(gap, 6)
                checks.append((f"{dataset}: DMIL never > {ROW_TOLERANCE:g} point below the best baseline on any type / "
                               "degraded set", gap >= -ROW_TOLERANCE, f"worst: {key} {gap:+.1f} points"))
        gaps = {k: v for k, v in dmil.get("degradation_gap", {}).items() if v}
        if gaps:
            key = max(gaps, key=lambda k: gaps[k]["mean"])
            worst = round(100 * gaps[key]["mean"], 6)
            checks.append((f"{dataset}: DMIL's degradation gap ≤ {DEGRADATION_GAP:g} points on every modality "
                           "(missing, noise, blank)", worst <= DEGRADATION_GAP, f"worst: {key} {worst:.1f} points"))
        partial = [(100 * (stat["mean"] - max(e["degraded"][k]["mean"] for e in baselines.values()
                                              if e["degraded"].get(k))), k)
                   for k, stat in dmil["degraded"].items() if k.startswith("partial") and stat
                   and any(e["degraded"].get(k) for e in baselines.values())]
        if partial:
            gap, key = min(partial)
            gap = round(gap, 6)
            checks.append((f"{dataset}: with partial noise DMIL ≥ the best baseline − {PARTIAL_TOLERANCE:g}",
                           gap >= -PARTIAL_TOLERANCE, f"worst: {key} {gap:+.1f} points"))
        ensemble = methods.get("ensemble", {}).get("by_interaction", {}).get("synergy")
        if ensemble:
            chance = 1.0 / dmil["num_labels"]
            gap = 100 * (ensemble["mean"] - chance)
            checks.append((f"{dataset}: ensemble near chance on synergy (within 10 points)", gap <= 10.0,
                           f"{100 * ensemble['mean']:.1f}% vs chance {100 * chance:.1f}%"))
        bayes = dmil.get("bayes_accuracy", {}).get("overall")
        if dataset in BAYES_GAP and bayes:
            gap = round(100 * (bayes - dmil["accuracy"]["mean"]), 6)
            checks.append((f"{dataset}: DMIL within {BAYES_GAP[dataset]:g} points of the Bayes limit",
                           gap <= BAYES_GAP[dataset], f"{gap:.1f} points below"))
        profile = dmil.get("interaction_profile")
        if profile:
            wrong = [kind for kind, weights in profile.items() if max(weights, key=weights.get) != kind]
            checks.append((f"{dataset}: DMIL's readout gives the matching component the largest mean weight for every "
                           "type", not wrong, "mismatched: " + (", ".join(wrong) if wrong else "none")))
        match = dmil.get("readout_match")
        if match and dataset in READOUT_MATCH_CONFIGURATIONS:
            checks.append((f"{dataset}: DMIL's readout names the true type on ≥ {100 * READOUT_MATCH:.0f}% of test "
                           "samples", round(match["mean"], 6) >= READOUT_MATCH, f"{100 * match['mean']:.1f}%"))
    return checks


def _profile_table(title: str, profile: dict) -> list[str]:
    components = list(next(iter(profile.values())))
    lines = ["", title, "", "| type | " + " | ".join(components) + " |", "|" + "---|" * (len(components) + 1)]
    for kind, weights in profile.items():
        lines.append(f"| {kind} | " + " | ".join(f"{weights[c]:.2f}" for c in components) + " |")
    return lines


def _readout_section(methods: dict, reference: dict | None) -> list[str]:
    rows = []
    for method, entry in methods.items():
        if entry.get("readout_match"):
            rows.append(f"| {method} `interaction_weights` | {_fmt(entry['readout_match'])} |")
        if entry.get("gate_match"):
            rows.append(f"| {method} `gate_weights` (the mixture) | {_fmt(entry['gate_match'])} |")
    if reference:
        rows.append(f"| reference: `dmil_hf.interactions.per_sample_interactions` (true labels, out-of-fold MLPs) "
                    f"| {100 * reference['match']:.1f} |")
    if not rows:
        return []
    lines = ["", "Per-sample readout: share of test samples whose largest weight is the true type's component (%):", "",
             "| weights | match |", "|---|---|"] + rows
    for method, entry in methods.items():
        if entry.get("interaction_profile"):
            lines += _profile_table(f"{method}: mean `interaction_weights` per component (columns) by ground-truth type "
                                    "(rows):", entry["interaction_profile"])
        if entry.get("gate_profile"):
            lines += _profile_table(f"{method}: mean `gate_weights` per component by ground-truth type:",
                                    entry["gate_profile"])
    if reference:
        lines += _profile_table("reference estimator: mean weight per component by ground-truth type:",
                                reference["profile"])
    return lines


def _ablation_section(ablation: dict | None) -> list[str]:
    if not ablation or not ablation.get("summary"):
        return []
    lines = ["## Ablation: the paper's settings against each deviation", "",
             f"DMIL only, {ablation['seeds']} seed(s) per variant; test accuracy (%), the mean over the degraded test "
             "sets, and the per-sample match of the readout and of the gate. Variants (`DmilConfig` overrides):", ""]
    lines += [f"- `{name}`: " + (", ".join(f"`{k}={v!r}`" for k, v in overrides.items()) or "the package's defaults")
              for name, overrides in ablation["variants"].items()]
    for dataset, variants in ablation["summary"].items():
        lines += ["", f"### {dataset}", "", "| variant | overall | synergy | degraded (mean) | readout match | gate match |",
                  "|---|---|---|---|---|---|"]
        for name in ablation["variants"]:
            if name in variants:
                v = variants[name]
                lines.append(f"| {name} | {_fmt(v['accuracy'])} | {_fmt(v['synergy'])} | {_fmt(v['degraded_mean'])} | "
                             f"{_fmt(v['readout_match'])} | {_fmt(v['gate_match'])} |")
    return lines + [""]


def render_markdown(results: dict) -> str:
    summary = results["summary"]
    jobs = results.get("jobs") or 1
    if results.get("combined_from"):
        origin = ("Combined by `dmil bench --combine " + " ".join(s["path"] for s in results["combined_from"])
                  + "` (where two files hold the same run, the later one's).")
    else:
        origin = ("Command: " f"`dmil bench{' --quick' if results['mode'] == 'quick' else ''} --seeds {results['seeds']}"
                  f"{' --jobs ' + str(jobs) if jobs > 1 else ''}`"
                  + (" (training times are under the shared load of parallel runs)." if jobs > 1 else "."))
    lines = [f"# DMIL benchmark ({results['mode']} run, {results['towers']} towers, {results['seeds']} seed(s))", "",
             "Mean ± std over seeds. Accuracies in %. " + origin, ""]
    for dataset, methods in summary.items():
        first = next(iter(methods.values()))
        kinds = sorted(first["by_interaction"])
        degraded = sorted(first["degraded"])
        bayes = first.get("bayes_accuracy") or {}
        lines += [f"## {dataset}", ""]
        if bayes:
            lines.append("Bayes limit: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(bayes.items())
                                                     if isinstance(v, (int, float))))
            lines.append("")
        header = ["method", "overall"] + kinds
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, entry in methods.items():
            row = [f"**{method}**" if method == "dmil" else method, _fmt(entry["accuracy"])]
            row += [_fmt(entry["by_interaction"].get(k)) for k in kinds]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "Degraded test sets (`dmil_hf.data.degrade`; blank and the natural corruptions are held out of "
                  "every method's training):", ""]
        lines += ["| method | " + " | ".join(degraded) + " |", "|" + "---|" * (len(degraded) + 1)]
        for method, entry in methods.items():
            lines.append(f"| {method} | " + " | ".join(_fmt(entry["degraded"].get(k)) for k in degraded) + " |")
        gaps = sorted(first.get("degradation_gap") or {})
        if gaps:
            lines += ["", "Degradation gap (attainable level minus accuracy, points; the attainable level keeps each "
                      "type's clean accuracy except what the lost modality makes impossible):", ""]
            lines += ["| method | " + " | ".join(gaps) + " |", "|" + "---|" * (len(gaps) + 1)]
            for method, entry in methods.items():
                lines.append(f"| {method} | " + " | ".join(_fmt(entry["degradation_gap"].get(k)) for k in gaps) + " |")
        lines += ["", "| method | train s | latency ms / batch of 64 | peak RSS MB | parameters |", "|---|---|---|---|---|"]
        for method, entry in methods.items():
            lines.append(f"| {method} | {_fmt(entry['train_seconds'], 1, 1)} | {_fmt(entry['latency_ms_per_batch64'], 1, 2)}"
                         f" | {_fmt(entry['peak_memory_mb'], 1, 0)} | {entry['parameters']:,} |")
        lines += _readout_section(methods, (results.get("reference_readout") or {}).get(dataset))
        lines.append("")
    lines += _ablation_section(results.get("ablation"))
    lines += ["## Targets", ""]
    for name, ok, detail in check_targets(summary):
        lines.append(f"- [{'x' if ok else ' '}] {name}: {detail}")
    return "\n".join(lines) + "\n"


def render_plots(results: dict, output_dir) -> list[Path]:
    """One bar chart per dataset: accuracy per interaction type and degraded set, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for dataset, methods in results["summary"].items():
        first = next(iter(methods.values()))
        groups = ["overall"] + sorted(first["by_interaction"]) + sorted(first["degraded"])
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) * len(methods) / 2), 3.6))
        width = 0.8 / len(methods)
        for i, (method, entry) in enumerate(methods.items()):
            stats = [entry["accuracy"]] + [entry["by_interaction"].get(k) for k in sorted(first["by_interaction"])]
            stats += [entry["degraded"].get(k) for k in sorted(first["degraded"])]
            means = [100 * s["mean"] if s else 0 for s in stats]
            stds = [100 * s["std"] if s else 0 for s in stats]
            ax.bar(np.arange(len(groups)) + i * width, means, width, yerr=stds, label=method)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{dataset}: who wins on which samples")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(output_dir) / f"accuracy_{dataset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
        path = _noise_curve_plot(dataset, methods, output_dir, plt)
        if path:
            paths.append(path)
    return paths


def _noise_curve_plot(dataset, methods, output_dir, plt):
    """Accuracy against the noise level of one modality (clean, partial 25/50/75 %, full noise) per method, one panel
    per modality, with each method's missing-modality accuracy as a dashed line."""
    first = next(iter(methods.values()))
    modalities = sorted(k[len("noise_"):] for k in first["degraded"] if k.startswith("noise_"))
    if not modalities:
        return None
    levels = [(0.0, None), (0.25, "partial25"), (0.5, "partial50"), (0.75, "partial75"), (1.0, "noise")]
    fig, axes = plt.subplots(1, len(modalities), figsize=(3.6 * len(modalities), 3.2), sharey=True, squeeze=False)
    for ax, modality in zip(axes[0], modalities):
        for i, (method, entry) in enumerate(methods.items()):
            points = [(x, entry["accuracy"] if kind is None else entry["degraded"].get(f"{kind}_{modality}"))
                      for x, kind in levels]
            points = [(x, 100 * stat["mean"]) for x, stat in points if stat]
            line, = ax.plot(*zip(*points), marker="o", label=method)
            missing = entry["degraded"].get(f"missing_{modality}")
            if missing:
                ax.axhline(100 * missing["mean"], color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.set_title(f"noise on {modality}")
        ax.set_xlabel("noise level (dashed: modality missing)")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{dataset}: accuracy as one modality degrades", fontsize=10)
    fig.tight_layout()
    path = Path(output_dir) / f"degradation_{dataset}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["check_targets", "render_markdown", "render_plots"]
