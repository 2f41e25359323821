"""Turn benchmark results into `results.md` (tables + the targets, checked) and PNG plots."""

from __future__ import annotations

from pathlib import Path


def _fmt(stat, scale=100.0, digits=1):
    if not stat:
        return "–"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def check_targets(summary: dict) -> list[tuple[str, bool, str]]:
    """The benchmark targets of the issue, each with whether it holds and by how much."""
    checks = []
    for dataset, methods in summary.items():
        if "dmil" not in methods:
            continue
        dmil = methods["dmil"]
        baselines = {m: e for m, e in methods.items() if m != "dmil"}
        if baselines:
            best_name, best = max(baselines.items(), key=lambda kv: kv[1]["accuracy"]["mean"])
            gap = 100 * (dmil["accuracy"]["mean"] - best["accuracy"]["mean"])
            # Rounded before comparing: accuracies are sample fractions, and float noise must not flip a tie.
            gap = round(gap, 6)
            checks.append((f"{dataset}: DMIL ≥ best baseline ({best_name}) + 2 points overall", gap >= 2.0,
                           f"{gap:+.1f} points"))
            worst = []
            for group in ("by_interaction", "degraded"):
                for key, stat in dmil[group].items():
                    best_other = max((e[group][key]["mean"] for e in baselines.values() if e[group].get(key)), default=None)
                    if stat and best_other is not None:
                        worst.append((100 * (stat["mean"] - best_other), key))
            if worst:
                gap, key = min(worst)
                gap = round(gap, 6)
                checks.append((f"{dataset}: DMIL never > 1 point below the best baseline on any type / degraded set",
                               gap >= -1.0, f"worst: {key} {gap:+.1f} points"))
        ensemble = methods.get("ensemble", {}).get("by_interaction", {}).get("synergy")
        if ensemble:
            chance = 1.0 / dmil["num_labels"]
            gap = 100 * (ensemble["mean"] - chance)
            checks.append((f"{dataset}: ensemble near chance on synergy (within 10 points)", gap <= 10.0,
                           f"{100 * ensemble['mean']:.1f}% vs chance {100 * chance:.1f}%"))
        bayes = dmil.get("bayes_accuracy", {}).get("overall")
        if dataset == "synthetic" and bayes:
            gap = round(100 * (bayes - dmil["accuracy"]["mean"]), 6)
            checks.append(("synthetic: DMIL within 3 points of the Bayes limit", gap <= 3.0, f"{gap:.1f} points below"))
        profile = dmil.get("interaction_profile")
        if profile:
            wrong = [kind for kind, weights in profile.items() if max(weights, key=weights.get) != kind]
            checks.append((f"{dataset}: DMIL's largest gate weight is the matching component for every type",
                           not wrong, "mismatched: " + (", ".join(wrong) if wrong else "none")))
    return checks


def render_markdown(results: dict) -> str:
    summary = results["summary"]
    lines = [f"# DMIL benchmark ({results['mode']} run, {results['towers']} towers, {results['seeds']} seed(s))", "",
             "Mean ± std over seeds. Accuracies in %. Command: "
             f"`dmil bench{' --quick' if results['mode'] == 'quick' else ''} --seeds {results['seeds']}"
             f"{' --jobs ' + str(results['jobs']) if results.get('jobs', 1) > 1 else ''}`"
             + (" (training times are under the shared load of parallel runs)." if results.get("jobs", 1) > 1 else "."),
             ""]
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
        lines += ["", "Degraded test sets (one modality replaced by noise, or missing):", ""]
        lines += ["| method | " + " | ".join(degraded) + " |", "|" + "---|" * (len(degraded) + 1)]
        for method, entry in methods.items():
            lines.append(f"| {method} | " + " | ".join(_fmt(entry["degraded"].get(k)) for k in degraded) + " |")
        lines += ["", "| method | train s | latency ms / batch of 64 | peak RSS MB | parameters |", "|---|---|---|---|---|"]
        for method, entry in methods.items():
            lines.append(f"| {method} | {_fmt(entry['train_seconds'], 1, 1)} | {_fmt(entry['latency_ms_per_batch64'], 1, 2)}"
                         f" | {_fmt(entry['peak_memory_mb'], 1, 0)} | {entry['parameters']:,} |")
        for method, entry in methods.items():
            profile = entry.get("interaction_profile")
            if not profile:
                continue
            components = list(next(iter(profile.values())))
            lines += ["", f"{method}: mean interaction weight per component (columns) by ground-truth type (rows):", "",
                      "| type | " + " | ".join(components) + " |", "|" + "---|" * (len(components) + 1)]
            for kind, weights in profile.items():
                lines.append(f"| {kind} | " + " | ".join(f"{weights[c]:.2f}" for c in components) + " |")
        lines.append("")
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
    return paths


__all__ = ["check_targets", "render_markdown", "render_plots"]
