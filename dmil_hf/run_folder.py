"""A run's output folder: the marker that says what it holds (`dmil_run.json`), what `--resume` / `--overwrite` may do
with it (`check_output_dir`, `check_resume_matches`), removing an earlier run without touching the user's files
(`prepare_output_dir`), and the training time counted across sessions (`RunClock`)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .run_settings import RunSettings

logger = logging.getLogger(__name__)

RUN_MARKER = "dmil_run.json"  # written first into every run folder: what the run is, its settings, its state
TRAIN_LOG = "train_log.jsonl"  # every log event of the run's training, all its loss terms (training.TrainLogCallback)
# The settings a resumed run must share with the interrupted one (the others only say where output goes).
RESUME_KEYS = ("dataset", "method", "towers", "pretrained", "stage_epochs", "stage_learning_rates", "epochs",
               "learning_rate", "batch_size", "seed", "lora", "dataset_kwargs", "config_overrides", "tower_pooling",
               "freeze_towers")


def read_run_marker(output_dir: Path) -> dict | None:
    """The run marker of `output_dir` as a dict, or None when there is none (or it does not read as one)."""
    marker = _read_json(Path(output_dir) / RUN_MARKER)
    return marker if isinstance(marker, dict) else None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_kind(path: Path) -> str:
    """What `path` holds: "empty" (absent or empty), "running" / "finished" (a dmil run), or "foreign"."""
    if not path.exists() or not any(path.iterdir()):
        return "empty"
    marker = _read_json(path / RUN_MARKER)
    if isinstance(marker, dict) and marker.get("package") == "dmil_hf":
        return "finished" if marker.get("status") == "finished" else "running"
    # Runs written before the marker existed: a finished one has metrics.json with its settings; an interrupted
    # one, the per-stage checkpoint folders.
    metrics = _read_json(path / "metrics.json")
    if isinstance(metrics, dict) and "settings" in metrics and "method" in metrics and (path / "config.json").exists():
        return "finished"
    config = _read_json(path / "config.json")  # a model folder written by save_pretrained of one of our classes
    if isinstance(config, dict) and str(config.get("model_type", "")).startswith("dmil"):
        return "finished"
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and any((checkpoints / n).is_dir() for n in ("stage1", "stage2", "stage3", "train")):
        return "running"
    return "foreign"


def check_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> str:
    """Read-only check of `--output-dir` against `--resume` / `--overwrite`; returns what it holds (see `run_kind`).
    Nothing is deleted here: a bad dataset or setting found later must not cost the user the previous run."""
    path = Path(output_dir)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one of them.")
    kind = run_kind(path)
    if resume:
        if kind == "finished":
            raise FileExistsError(f"--resume: the run in {str(path)!r} already finished (metrics.json is written and "
                                  "its checkpoints are gone); nothing to continue. Pass --overwrite to train it again "
                                  "or choose another --output-dir.")
        if kind != "running":
            raise FileNotFoundError(f"--resume was given but {str(path)!r} holds no dmil run to continue (no "
                                    f"{RUN_MARKER} or checkpoints); expected the --output-dir of an interrupted run.")
    elif kind == "foreign":
        raise FileExistsError(f"output folder {str(path)!r} is not empty and was not written by dmil (no {RUN_MARKER} "
                              "or metrics.json); refusing to write into or delete it. Choose another --output-dir.")
    elif kind != "empty" and not overwrite:
        raise FileExistsError(f"output folder {str(path)!r} is not empty; pass --overwrite to replace it or --resume "
                              "to continue it.")
    return kind


def data_summary(dsd) -> dict:
    """Rows and datasets' fingerprint of every split: what the marker records, so `--resume` can compare."""
    return {name: {"rows": len(split), "fingerprint": getattr(split, "_fingerprint", None)}
            for name, split in dsd.items()}


def check_resume_matches(output_dir: Path, settings: RunSettings, data: dict) -> None:
    """Refuse to resume with settings or data that differ from the interrupted run's (unless told to)."""
    marker = _read_json(output_dir / RUN_MARKER)
    if not isinstance(marker, dict):
        logger.warning("Resume: %s has no %s (written by an older dmil_hf), so its settings cannot be compared.",
                       output_dir, RUN_MARKER)
        return
    now = {k: v for k, v in json.loads(json.dumps(asdict(settings), default=str)).items() if k in RESUME_KEYS}
    before = marker.get("settings", {})
    # A setting the interrupted run's marker lacks (written before the setting existed) had its default.
    defaults = json.loads(json.dumps(asdict(RunSettings()), default=str))
    before = {k: before.get(k, defaults.get(k)) for k in RESUME_KEYS}
    differences = [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in RESUME_KEYS if before.get(k) != now.get(k)]
    old_data = marker.get("data", {})
    for name, info in data.items():
        old = old_data.get(name, {})
        if old.get("rows") != info["rows"]:
            differences.append(f"{name} rows: {old.get('rows')} -> {info['rows']}")
        elif old.get("fingerprint") != info["fingerprint"]:
            differences.append(f"{name} data: changed (fingerprint {old.get('fingerprint')} -> {info['fingerprint']})")
    if differences and not settings.resume_with_changes:
        raise ValueError(f"--resume: the settings differ from the interrupted run in {str(output_dir)!r} ("
                         f"{'; '.join(differences)}), so its finished stages and checkpoints would be mixed with the "
                         "new ones. Resume with the same settings, or pass --resume-with-changes to continue anyway.")
    if differences:
        logger.warning("Resume with changed settings (--resume-with-changes): %s", "; ".join(differences))


def write_run_marker(output_dir: Path, settings: RunSettings, data: dict, **state) -> None:
    marker = _read_json(output_dir / RUN_MARKER)
    marker = marker if isinstance(marker, dict) else {}
    marker.update(package="dmil_hf", settings=json.loads(json.dumps(
        {k: v for k, v in asdict(settings).items() if k in RESUME_KEYS}, default=str)), data=data, **state)
    tmp = output_dir / f".{RUN_MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2))
    tmp.replace(output_dir / RUN_MARKER)


# What a run folder holds besides the files its marker lists (written before the list exists, or by `dmil evaluate`).
RUN_ENTRIES = (RUN_MARKER, "checkpoints", "adapters", "final", "metrics.json", "interaction_profile.json",
               "interaction_weights.png", TRAIN_LOG)


def _remove_run(path: Path) -> None:
    """Delete the run in `path`. With a marker that lists the run's files, only those (and the run's own folders and
    `eval_*.json` reports) go, and anything else, the user's, stays with a warning; a run written before the list
    existed is removed whole."""
    marker = _read_json(path / RUN_MARKER)
    listed = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(listed, list):
        shutil.rmtree(path)
        return
    ours = set(listed) | set(RUN_ENTRIES)
    kept = []
    for entry in path.iterdir():
        if entry.name in ours or (entry.name.startswith("eval_") and entry.suffix == ".json"):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        else:
            kept.append(entry.name)
    if kept:
        logger.warning("--overwrite: kept %s in %s: dmil did not write them.", sorted(kept), path)


def prepare_output_dir(output_dir: str | Path, resume: bool, overwrite: bool, kind: str | None = None) -> Path:
    """Make `output_dir` ready to train into; an earlier run there is deleted only with `overwrite` and only when it
    is recognisably a dmil run (`check_output_dir` decides, and refuses everything else)."""
    path = Path(output_dir)
    kind = kind or check_output_dir(path, resume, overwrite)
    if overwrite and kind in ("running", "finished"):
        _remove_run(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunClock:
    """Counts training time across sessions: each checkpoint save records the seconds spent so far, so a resumed run
    adds its own time to the time the interrupted sessions spent up to their last saved checkpoint."""

    def __init__(self, output_dir: Path, settings: RunSettings, data: dict, before: float):
        self.output_dir, self.settings, self.data, self.before = output_dir, settings, data, before
        self.start = time.perf_counter()

    def session(self) -> float:
        return time.perf_counter() - self.start

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class RunClockCallback(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    write_run_marker(clock.output_dir, clock.settings, clock.data, status="running",
                                     train_seconds_saved=clock.before + clock.session())

        return RunClockCallback()

__all__ = ["RESUME_KEYS", "RUN_ENTRIES", "RUN_MARKER", "TRAIN_LOG", "RunClock", "check_output_dir",
           "check_resume_matches", "data_summary", "prepare_output_dir", "read_run_marker", "run_kind",
           "write_run_marker"]
