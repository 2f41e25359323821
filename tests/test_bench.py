"""dmil bench: the mean ± std summary, the report's tables and target checks, and one small real run."""

import json

import pytest

from dmil_hf import bench
from dmil_hf.bench import run_benchmark, summarize
from dmil_hf.bench_report import check_targets, render_markdown, render_plots


def fake_run(method, seed, overall, synergy, degraded, profile=None):
    run = {"dataset": "synthetic", "method": method, "seed": seed,
           "test": {"accuracy": overall, "by_interaction": {"redundancy": 0.9, "synergy": synergy}, "n": 100},
           "degraded": {"missing_a": degraded, "noise_a": degraded - 0.1, "partial50_a": degraded + 0.05},
           "degradation_gap": {"missing_a": 0.03, "noise_a": 0.13},
           "train_seconds": 10.0 + seed, "peak_memory_mb": 500.0,
           "latency_ms_per_batch64": 2.0, "parameters": 1234, "num_labels": 4,
           "bayes_accuracy": {"overall": 0.96, "redundancy": 1.0, "synergy": 0.9}}
    if profile:
        run["readout"] = {"match": 0.5 + seed / 10, "profile": profile}
    return run


PROFILE = {"redundancy": {"redundancy": 0.7, "synergy": 0.3}, "synergy": {"redundancy": 0.6, "synergy": 0.4}}


def runs():
    return [fake_run("dmil", 0, 0.90, 0.70, 0.80, PROFILE), fake_run("dmil", 1, 0.94, 0.74, 0.84, PROFILE),
            fake_run("joint", 0, 0.86, 0.72, 0.70), fake_run("joint", 1, 0.88, 0.76, 0.72),
            fake_run("ensemble", 0, 0.70, 0.26, 0.60), fake_run("ensemble", 1, 0.72, 0.28, 0.62)]


def test_summary_is_mean_and_std_over_seeds():
    summary = summarize(runs())["synthetic"]
    assert list(summary) == ["dmil", "joint", "ensemble"]
    assert summary["dmil"]["accuracy"]["mean"] == pytest.approx(0.92)
    assert summary["dmil"]["accuracy"]["std"] == pytest.approx(0.02)
    assert summary["joint"]["by_interaction"]["synergy"]["mean"] == pytest.approx(0.74)
    assert summary["ensemble"]["degraded"]["missing_a"]["mean"] == pytest.approx(0.61)
    assert summary["dmil"]["train_seconds"]["mean"] == pytest.approx(10.5)


def test_targets_are_checked_with_their_margins():
    checks = {name.split(": ", 1)[1]: (ok, detail) for name, ok, detail in check_targets(summarize(runs()))}
    overall = next(v for k, v in checks.items() if k.startswith("DMIL ≥ best baseline (joint)"))
    assert overall == (True, "+5.0 points")
    # digits must beat the best baseline by 2 points; synthetic only match it
    digits = check_targets(summarize([{**r, "dataset": "digits"} for r in runs()]))
    assert ("digits: DMIL ≥ best baseline (joint) + 2 points overall", True, "+5.0 points") in digits
    worst = next(v for k, v in checks.items() if k.startswith("DMIL never"))
    assert worst == (False, "worst: synergy -2.0 points")
    ensemble = next(v for k, v in checks.items() if k.startswith("ensemble near chance"))
    assert ensemble[0] is True and "27.0%" in ensemble[1]
    bayes = next(v for k, v in checks.items() if k.startswith("DMIL within 2 points"))
    assert bayes == (False, "4.0 points below")
    largest = next(v for k, v in checks.items() if k.startswith("DMIL's readout gives the matching component"))
    assert largest == (False, "mismatched: synergy")
    match = next(v for k, v in checks.items() if k.startswith("DMIL's readout names the true type"))
    assert match == (False, "55.0%")
    gap = next(v for k, v in checks.items() if k.startswith("DMIL's degradation gap ≤ 2 points"))
    assert gap == (False, "worst: noise_a 13.0 points")
    partial = next(v for k, v in checks.items() if k.startswith("with partial noise DMIL"))
    assert partial == (True, "worst: partial50_a +11.0 points")


def test_rows_and_their_train_commands():
    """Every registered method is a row, joint_robust next to joint; a configuration's options and the row's own go
    on the `dmil train` command line, the preset's epochs last."""
    from dmil_hf.methods import METHODS

    assert set(bench.ROWS) == set(METHODS) | {"joint_robust"}
    assert list(bench.ROWS).index("joint_robust") == list(bench.ROWS).index("joint") + 1
    quick = bench.PRESETS["quick"]
    cmd = bench.train_command("digits-pretrained", "joint_robust", 1, "run", quick)
    text = " ".join(cmd)
    assert "--method joint" in text and "--text-model all-minilm-l6-v2 --audio-model whisper-tiny.en" in text
    assert "--train-corruption 0.15 --modality-dropout 0.1" in text
    assert cmd[-6:] == ["--stage-epochs", "3", "2", "2", "--epochs", "7"]
    paper = bench.train_command("synthetic", "dmil", 0, "run", bench.PRESETS["full"],
                                overrides=bench.ablation_variants()["paper"])
    assert paper[paper.index("--train-corruption") + 1] == "0.0"
    assert "reliability_gating=false" in paper and "--text-model" not in paper


def test_the_ablation_trains_a_deviation_only_where_it_acts():
    variants = bench.ablation_variants()
    assert variants["paper + frozen_tower_dropout=0.5"]["frozen_tower_dropout"] == 0.5
    assert variants["paper + partial_corruption_weight=0.3"]["partial_corruption_weight"] == 0.3
    assert bench.acts_on("partial_corruption_weight", "digits-pretrained")
    assert not bench.acts_on("partial_corruption_weight", "synthetic")
    assert variants["paper"]["reliability_refit_steps"] == 0 and "paper + reliability_refit_steps=3000" in variants
    where = {field: [c for c in bench.DATASETS if bench.acts_on(field, c)]
             for field in ("frozen_tower_dropout", "tower_pooling", "reliability_refit_steps", "lamb")}
    assert where == {"frozen_tower_dropout": ["digits-pretrained"], "tower_pooling": ["digits", "digits-pretrained"],
                     "reliability_refit_steps": ["synthetic", "synthetic3", "digits-pretrained"],
                     "lamb": list(bench.DATASETS)}


def test_report_and_plots(tmp_path):
    results = {"mode": "full", "towers": "tiny", "seeds": 2, "jobs": 2, "runs": runs(), "summary": summarize(runs())}
    text = render_markdown(results)
    assert "`dmil bench --seeds 2 --jobs 2`" in text
    assert "| **dmil** | 92.0 ± 2.0 | 90.0 ± 0.0 | 72.0 ± 2.0 |" in text
    assert "- [x] synthetic: DMIL ≥ best baseline (joint) overall: +5.0 points" in text
    assert "| dmil `interaction_weights` | 55.0 ± 5.0 |" in text
    assert "- [ ] synthetic: DMIL never > 1 point below" in text
    paths = render_plots(results, tmp_path)
    assert [p.name for p in paths] == ["accuracy_synthetic.png", "degradation_synthetic.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_combine_takes_the_later_file_s_run_of_the_same_row_and_seed(tmp_path):
    from dmil_hf.cli import main

    def write(name, runs_):
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"mode": "full", "towers": "tiny", "runs": runs_, "reference_readout": {}}))
        return path

    earlier = write("earlier", runs())
    again = [fake_run("dmil", 0, 0.96, 0.80, 0.80, PROFILE), fake_run("dmil", 1, 0.98, 0.80, 0.84, PROFILE)]
    later = write("later", again)
    assert main(["bench", "--combine", str(earlier), str(later), "--output-dir", str(tmp_path / "both")]) == 0
    combined = json.loads((tmp_path / "both" / "results.json").read_text())
    assert len(combined["runs"]) == 6 and combined["seeds"] == 2
    summary = combined["summary"]["synthetic"]
    assert summary["dmil"]["accuracy"]["mean"] == pytest.approx(0.97)  # the later file's DMIL runs
    assert summary["joint"]["accuracy"]["mean"] == pytest.approx(0.87)  # the earlier file's baselines
    text = (tmp_path / "both" / "results.md").read_text()
    assert f"Combined by `dmil bench --combine {earlier} {later}`" in text
    assert (tmp_path / "both" / "accuracy_synthetic.png").exists()
    quick = write("quick", [{**r, "seed": 5} for r in runs()])
    quick.write_text(json.dumps({**json.loads(quick.read_text()), "mode": "quick"}))
    with pytest.raises(ValueError, match="different modes or with different towers"):
        bench.combine_results([earlier, quick], tmp_path / "mixed")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a `dmil bench` results.json"):
        bench.combine_results([tmp_path / "broken.json"], tmp_path / "mixed")


def test_small_benchmark_end_to_end(tmp_path, monkeypatch):
    """DMIL, the joint-with-robustness-training row and the DMIL ablation on a small `synthetic`, trained two at a
    time in `dmil train` subprocesses."""
    small = {"dataset_kwargs": {"synthetic": {"num_samples": 300, "bayes_samples": 2000}}, "stage_epochs": (2, 1, 1),
             "seeds": 1, "ablation_seeds": 1}
    monkeypatch.setitem(bench.PRESETS, "quick", small)
    results = run_benchmark(tmp_path, datasets=["synthetic"], methods=["dmil", "joint_robust"], quick=True, jobs=2)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved["runs"]] == [("dmil", 0), ("joint_robust", 0)]
    for run in saved["runs"]:
        assert 0.0 <= run["test"]["accuracy"] <= 1.0 and run["test"]["n"] == 45
        kinds = ("missing", "noise", "blank", "partial25", "partial50", "partial75")
        assert set(run["degraded"]) == {f"{kind}_{m}" for kind in kinds for m in "ab"}
        assert set(run["degradation_gap"]) == {f"{kind}_{m}" for kind in ("missing", "noise", "blank") for m in "ab"}
        assert run["parameters"] > 0 and run["latency_ms_per_batch64"] > 0 and run["peak_memory_mb"] > 0
    assert "interaction_profile" in saved["runs"][0] and "interaction_profile" not in saved["runs"][1]
    assert {"readout", "gate"} <= set(saved["runs"][0]) and "readout" not in saved["runs"][1]
    assert 0.0 <= saved["runs"][0]["readout"]["match"] <= 1.0
    assert results["summary"]["synthetic"]["dmil"]["accuracy"]["std"] == 0.0
    # The reference estimator is read like a model's readout, from the same test split.
    assert 0.0 <= saved["reference_readout"]["synthetic"]["match"] <= 1.0
    # The ablation: the paper's settings, one deviation at a time (tower-only fields skipped on feature data), and
    # the defaults (the main DMIL run itself, not trained twice).
    variants = saved["ablation"]["summary"]["synthetic"]
    assert set(variants) == set(bench.ablation_variants()) - {"paper + tower_pooling=mean",
                                                               "paper + reliability_tower_gradient=0.25",
                                                               "paper + frozen_tower_dropout=0.5",
                                                               "paper + partial_corruption_weight=0.3"}
    assert variants["defaults"]["accuracy"]["mean"] == saved["runs"][0]["test"]["accuracy"]
    report = (tmp_path / "results.md").read_text()
    assert "## synthetic" in report and "## Ablation" in report and "| paper |" in report
    assert (tmp_path / "accuracy_synthetic.png").exists()
