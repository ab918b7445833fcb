"""Where a model comes from: a local directory or a Hugging Face repo id, resolved as mlx-lm resolves it.

mlx-lm (`mlx_lm.utils._download`) takes a path that exists as a local directory and anything else as a repo id,
fetched with huggingface_hub's `snapshot_download` (the hub cache, `HF_HOME`; offline with `HF_HUB_OFFLINE=1`).
We do the same, without importing MLX (the coordinator resolves the job's model too), and turn huggingface_hub's
failures into one line naming the id and how to fetch it. Every process resolves the name itself; what the job's
processes compare is the resolved directory's content (`runner.control.model_id`), not the name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# The files mlx-lm fetches for a model: mlx_lm.utils.DEFAULT_ALLOW_PATTERNS (tests/test_hub.py checks they agree).
MODEL_FILE_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]


class ModelNotFound(FileNotFoundError):
    """A model name that is neither a local model directory nor a fetchable Hugging Face id; one line for the user."""


def is_local(name: str | Path) -> bool:
    """mlx-lm's rule: a name that exists on disk is a local directory, anything else a repo id."""
    return Path(name).expanduser().exists()


def resolve_model(name: str | Path, what: str = "model", download: bool = True) -> Path:
    """The local directory holding model `name` (downloaded into the hub cache when it is a repo id not yet there,
    unless `download` is false). `what` names where the name came from in the error ("--model", "[model] path")."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{what} {name} is not a model directory; expected a directory with config.json")
        return path
    repo_id = str(name)
    if not _is_repo_id(repo_id):
        raise ModelNotFound(
            f"{what} {name} is not a model directory; expected a local directory with config.json "
            "(`runner models prepare` writes one) or a Hugging Face repo id"
        )
    from huggingface_hub import constants

    fetch = (
        f"fetch it with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`) where the hub is reachable"
    )
    cache = Path(constants.HF_HUB_CACHE)
    if constants.HF_HUB_OFFLINE and not (cache / f"models--{repo_id.replace('/', '--')}" / "snapshots").is_dir():
        # Known absent: answer before importing the download machinery (about a second on its own).
        raise ModelNotFound(
            f"{what} {repo_id} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set: {fetch}"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        resolved = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILE_PATTERNS, local_files_only=not download))
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{what} {repo_id}: no such model on the Hugging Face hub (or it is private)") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ModelNotFound(f"{what} {repo_id} is not in the Hugging Face cache {cache} and {why}: {fetch}") from None
    except HfHubHTTPError as e:
        raise ModelNotFound(f"{what} {repo_id}: the Hugging Face hub refused it ({str(e).splitlines()[0]})") from None
    if not (resolved / "config.json").is_file():
        raise ModelNotFound(f"{what} {repo_id} resolved to {resolved}, which has no config.json: not an MLX model")
    log.info("model %s resolved to %s", repo_id, resolved)
    return resolved


def _is_repo_id(name: str) -> bool:
    """'name' or 'org/name' as the hub accepts them (not a path like /x, ./x or a/b/c)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "~", os.sep)):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
