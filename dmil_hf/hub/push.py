"""The push to the Hub: check the target before any work, export (so the reload check runs), upload one commit."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from ._common import HUB_ID
from ..methods import get_method
from .export import export_model

logger = logging.getLogger(__name__)


class HubUnreachableError(ConnectionError):
    """The Hub cannot be reached (offline mode, no network) or refuses the token; raised before any work is done."""


def check_hub_reachable(token: str) -> str:
    """Ask the Hub who `token` belongs to; returns the user name, or raises `HubUnreachableError` in one line."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        info = HfApi(token=token).whoami()
    except OfflineModeIsEnabled:
        raise HubUnreachableError(f"the Hub ({constants.ENDPOINT}) cannot be reached: offline mode is on "
                                  "(HF_HUB_OFFLINE=1); unset it to push.") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise HubUnreachableError(f"the Hub ({constants.ENDPOINT}) refused the token (HTTP {status}); check it with "
                                  "`hf auth whoami` or log in again with `hf auth login`.") from None
    except (OSError, ValueError) as err:  # connection refused, DNS, timeouts (requests / httpx errors are OSErrors)
        raise HubUnreachableError(f"the Hub ({constants.ENDPOINT}) cannot be reached with this token: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    except Exception as err:  # httpx' transport errors are not OSErrors
        if not type(err).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):  # httpx2, httpcore2 too
            raise
        raise HubUnreachableError(f"the Hub ({constants.ENDPOINT}) cannot be reached with this token: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return info.get("name", "") if isinstance(info, dict) else ""


def check_push_target(repo_id, token: str | None = None, create_pr: bool = False,
                      revision: str | None = None, check_reachable: bool = True) -> str:
    """Validate a push before any work is done (a training run checks this first): the repo id, the token, and
    (`check_reachable`) that the Hub answers to that token. Returns the token to use."""
    from huggingface_hub import get_token

    if not isinstance(repo_id, str) or not HUB_ID.match(repo_id):
        raise ValueError(f"repo_id {repo_id!r} must look like 'user/name' or 'org/name'.")
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"create_pr=True opens a pull request against the default branch; revision {revision!r} "
                         "cannot be combined with it.")
    token = token or get_token()
    if token is None:
        raise ValueError("no Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass token= (--token).")
    if check_reachable:
        check_hub_reachable(token)
    return token


def push_model(model_dir, repo_id: str, private: bool = False, create_pr: bool = False, revision: str | None = None,
               token: str | None = None, commit_message: str | None = None, allow_pickle: bool = False) -> str:
    """
    Export `model_dir` to a temporary folder (running the fresh-process reload check), then create `repo_id` on the
    Hub if needed and upload the folder as one commit.

    Args:
        model_dir: folder written by `save_pretrained` / `dmil train`.
        repo_id: `user/name` or `org/name`.
        private: create the repo private (ignored when it already exists).
        create_pr: open a pull request instead of committing to the branch.
        revision: branch to commit to (created from the default branch if missing); the card's snippet loads it.
        token: a Hub token with write access; default: the one `hf auth login` saved, or `HF_TOKEN`.
        commit_message: default "Upload <method> model".
        allow_pickle: also load pickle weights (the upload is safetensors).

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    token = check_push_target(repo_id, token, create_pr, revision)
    with tempfile.TemporaryDirectory(prefix="dmil-push-") as tmp:
        folder = Path(tmp) / repo_id.split("/")[-1]
        report = export_model(model_dir, folder, allow_pickle=allow_pickle, repo_id=repo_id, revision=revision)
        config = json.loads((folder / "config.json").read_text())
        method = get_method(config.get("model_type")).title
        api = HfApi(token=token)
        # private=None leaves a new repo to the namespace's default visibility (public unless the org says otherwise).
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        if revision not in (None, "main") and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or f"Upload {method} model")
    logger.info(f"Pushed {len(report['files'])} files to {repo_id}: {info.commit_url}"
                + (f" (pull request {info.pr_url})" if info.pr_url else ""))
    return info.commit_url
