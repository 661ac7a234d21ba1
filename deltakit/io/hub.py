"""Hugging Face Hub repositories as inputs and outputs: ``org/name[@revision]`` → a local snapshot, and back.

The only module that imports huggingface_hub, and only the little it needs until a Hub id is used: its network
stack took 0.18 s to import, a sixth of every command's start-up, for local paths that never need it.

Downloads go into the standard huggingface_hub cache and fetch only what an operation reads: for a checkpoint the
config, tokenizer and generation files, then the weights of ONE format (safetensors when the repo has any, else
``pytorch_model*.bin``), and of a sharded checkpoint only the shards its index names; for an adapter
``adapter_config.json``, ``adapter_model.safetensors`` and the README.

The revision is pinned: the first download resolves it to a commit (and records ``refs/<revision>`` in the
cache, so the same id works offline later), every later download asks for that commit, and the commit is
returned for reports and model cards.

Offline (``HF_HUB_OFFLINE=1``) nothing touches the network, the repository listing included (mergekit lists the
repo first and so fails offline even with a warm cache): the weights are chosen from what the cached snapshot
holds. Online, they are chosen from the repository's listing, which the first ``snapshot_download`` caches.
The token comes from where huggingface_hub looks for it (``HF_TOKEN``, then the saved login).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import huggingface_hub
from huggingface_hub import constants  # its own small module

from deltakit.errors import HubError, HubUnavailableError, shorten

Kind = Literal["checkpoint", "adapter"]

# Small files a checkpoint carries besides its weights (merge copies them into its output). Exact names:
# huggingface_hub's patterns are fnmatch patterns whose "*" also crosses "/", into subfolders.
CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_ADAPTER_CARD = "README.md"
_LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"
_OFFLINE_HINT = "run once online, or unset HF_HUB_OFFLINE"


@dataclass(frozen=True)
class HubRef:
    """A Hub model repository and, optionally, the revision (branch, tag or commit) asked for."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


@dataclass(frozen=True)
class ResolvedRepo:
    """A Hub repository downloaded (or found in the cache) at one commit.

    Attributes:
        local_dir: the cached snapshot folder holding the files fetched.
        repo_id: ``org/name``.
        revision_requested: the revision asked for (None: the default branch).
        commit_hash: the 40-hex commit the revision pointed to; record it to make a run reproducible.
    """

    local_dir: Path
    repo_id: str
    revision_requested: str | None
    commit_hash: str

    @property
    def pinned(self) -> str:
        """``org/name@<commit>``: names exactly these files from now on."""
        return f"{self.repo_id}@{self.commit_hash}"


def parse_hub_id(text: str) -> HubRef:
    """Split ``org/name`` or ``org/name@revision`` (the revision may contain ``/``, e.g. ``refs/pr/1``).

    Args:
        text: the id as the user wrote it.

    Returns:
        The repository and revision.

    Raises:
        HubError: not of that form, or the name breaks huggingface_hub's rules for repo ids.
    """
    repo_id, at, revision = text.partition("@")
    if at and not revision.strip():
        raise HubError("empty revision after '@'; write org/name@revision", path=text)
    if repo_id.count("/") != 1:
        raise HubError("not a Hub model id; write org/name or org/name@revision", path=text)
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"not a valid Hub repo id ({e})", path=text) from e
    return HubRef(repo_id, revision or None)


def is_hub_id(text: str | Path) -> bool:
    """Whether ``text`` names a Hub repository rather than a local path.

    True only when no file or directory of that name exists and the text has the form ``org/name[@revision]``
    with a valid repo id; so ``out/model``, once created, is a path again.
    """
    if isinstance(text, Path) or Path(text).exists():
        return False
    try:
        parse_hub_id(text)
    except HubError:
        return False
    return True


def resolve(ref: HubRef | str, *, kind: Kind) -> ResolvedRepo:
    """Find a Hub repository's files in the cache, downloading what is missing (never when offline).

    Args:
        ref: a :class:`HubRef` or its text, ``org/name[@revision]``.
        kind: ``checkpoint`` (config, tokenizer and generation files, then one weights format: the shards an
            index names, else ``model.safetensors``, else every top-level weights file of that format) or
            ``adapter`` (``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md`` if any).

    Returns:
        The snapshot folder and the commit it holds.

    Raises:
        HubError: no such repository or revision, gated or unauthorized, or the repository lacks the files.
        HubUnavailableError: offline (or the Hub unreachable) and the cache lacks what is needed.
    """
    ref = parse_hub_id(ref) if isinstance(ref, str) else ref
    offline = constants.is_offline_mode()
    with _translated_errors(ref, offline):
        first = CHECKPOINT_FILES if kind == "checkpoint" else (*ADAPTER_FILES, _ADAPTER_CARD)
        snapshot_dir = _first_download(ref, first, offline)
        commit = snapshot_dir.name
        if kind == "checkpoint":
            required = _fetch_weights(ref, commit, snapshot_dir, offline)
        else:
            required = list(ADAPTER_FILES)
        missing = [name for name in required if not (snapshot_dir / name).is_file()]
    if missing:
        raise _lacking(shorten(missing), ref, commit, offline)
    return ResolvedRepo(snapshot_dir, ref.repo_id, ref.revision, commit)


def local_path(path_or_id: str | Path, *, kind: Kind) -> tuple[Path, ResolvedRepo | None]:
    """What the user named, as a local path: itself if it exists or is no Hub id, else the id's snapshot folder
    (:func:`resolve`) and where it came from. The caller reports a path that does not exist.

    Raises:
        HubError, HubUnavailableError: as :func:`resolve`.
    """
    if not is_hub_id(path_or_id):
        return Path(path_or_id), None
    resolved = resolve(str(path_or_id), kind=kind)
    return resolved.local_dir, resolved


def resolve_commit(ref: HubRef | str) -> str:
    """The commit a revision points to now, without downloading any file (offline: from the cache's refs).

    A revision that is already a commit hash is returned as is, unchecked.

    Raises:
        HubError, HubUnavailableError: as :func:`resolve`.
    """
    ref = parse_hub_id(ref) if isinstance(ref, str) else ref
    offline = constants.is_offline_mode()
    with _translated_errors(ref, offline):
        api = huggingface_hub.HfApi()
        return api.resolve_revision(ref.repo_id, revision=ref.revision, local_files_only=offline).resolved


def push(
    folder: str | Path, repo_id: str, *, private: bool = True, commit_message: str = "Upload with deltakit"
) -> str:
    """Upload a folder (an adapter or a merged checkpoint, with its model card) to a Hub model repository.

    The repository is created if needed; an existing one keeps its visibility.

    Args:
        folder: the directory to upload, as it is (its README.md is the model card).
        repo_id: ``org/name``.
        private: create the repository private.
        commit_message: the Hub commit's message.

    Returns:
        The URL of the commit made.

    Raises:
        HubError: bad repo id, unauthorized (no token, or no write access).
        HubUnavailableError: HF_HUB_OFFLINE is set, or the Hub cannot be reached.
    """
    ref = parse_hub_id(repo_id)
    if ref.revision:
        raise HubError("push to a repository, not a revision (drop the '@...')", path=repo_id)
    if constants.is_offline_mode():
        raise HubUnavailableError("cannot upload while HF_HUB_OFFLINE is set; unset it to push", path=repo_id)
    with _translated_errors(ref, offline=False):
        api = huggingface_hub.HfApi()
        api.create_repo(ref.repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=ref.repo_id, commit_message=commit_message)
    return commit.commit_url


def _first_download(ref: HubRef, names: tuple[str, ...], offline: bool) -> Path:
    """Resolve the revision to a snapshot folder, fetching the small files ``names`` (those that exist).

    Online, this also caches the repository's file listing for the commit (huggingface_hub's ``trees/``).
    """
    from huggingface_hub.errors import IncompleteSnapshotError

    try:
        return Path(huggingface_hub.snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=[_literal(n) for n in names], local_files_only=offline
        ))
    except IncompleteSnapshotError as e:
        # Offline, with a listing cached by an earlier download of other files: these small files are
        # optional (the weights are checked strictly later), so go on with what the cache has.
        if not offline:
            raise
        return Path(e.snapshot_path)


def _fetch_weights(ref: HubRef, commit: str, snapshot_dir: Path, offline: bool) -> list[str]:
    """Download one format's weights (and its index) at ``commit``; return the files that must now be there."""
    files = _top_level_files(ref, commit, snapshot_dir, offline)
    suffix = ".safetensors" if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files) else ".bin"
    indexes = sorted(f for f in files if f.endswith(f"{suffix}.index.json"))
    if len(indexes) == 1:
        _download(ref, commit, indexes, offline)
        weights = _shards_named_in(snapshot_dir / indexes[0])
        wanted = [indexes[0], *weights]
    else:
        # No index (or several, which the checkpoint reader refuses and names): transformers reads
        # model.safetensors by name and ignores other files beside it (Mistral's consolidated.safetensors).
        if suffix == ".bin":
            weights = [f for f in files if f.endswith(".bin") and "pytorch_model" in f]
        elif "model.safetensors" in files:
            weights = ["model.safetensors"]
        else:
            weights = [f for f in files if f.endswith(suffix)]
        if not weights:
            raise _lacking("weights (*.safetensors or pytorch_model*.bin)", ref, commit, offline)
        wanted = [*indexes, *weights]
    _download(ref, commit, wanted, offline)
    return wanted


def _top_level_files(ref: HubRef, commit: str, snapshot_dir: Path, offline: bool) -> list[str]:
    """Offline: what the cached snapshot holds. Online: the repository's listing at ``commit``."""
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    if not offline:
        try:
            listing = huggingface_hub.get_cached_repo_tree(ref.repo_id, revision=commit)
            return [f.path for f in listing if "/" not in f.path]
        except CachedRepoTreeNotFoundError:
            pass  # the Hub was unreachable and snapshot_download fell back on a cache made without a listing
    return sorted(p.name for p in snapshot_dir.iterdir() if p.is_file())


def _shards_named_in(index_path: Path) -> list[str]:
    """The shard file names an index's weight_map points to (the checkpoint reader validates the rest)."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise HubError(f"unreadable index ({e})", path=index_path) from e
    if not isinstance(weight_map, dict):
        raise HubError('no "weight_map" object in the index', path=index_path)
    return sorted({str(shard) for shard in weight_map.values() if "/" not in str(shard)})


def _download(ref: HubRef, commit: str, names: list[str], offline: bool) -> None:
    huggingface_hub.snapshot_download(
        ref.repo_id, revision=commit, allow_patterns=[_literal(n) for n in names], local_files_only=offline
    )


def _lacking(what: str, ref: HubRef, commit: str, offline: bool) -> HubError:
    """Files missing at ``commit``: offline, from the cache (fixable online); online, from the repository."""
    if offline:
        return HubUnavailableError(f"the cached snapshot at commit {commit} lacks {what}; {_OFFLINE_HINT}",
                                   path=str(ref))
    return HubError(f"the repository at commit {commit} lacks {what}", path=str(ref))


def _literal(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return re.sub(r"([*?\[\]])", r"[\1]", name)


@contextmanager
def _translated_errors(ref: HubRef, offline: bool) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line deltakit errors naming the id and the fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    subject = str(ref)
    try:
        yield
    except GatedRepoError as e:  # before RepositoryNotFoundError, its parent class
        raise HubError(
            f"gated repository: accept its terms at https://huggingface.co/{ref.repo_id} and {_LOGIN_HINT}",
            path=subject,
        ) from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"not a local path, and no such repository on the Hub (if it is private, {_LOGIN_HINT})", path=subject
        ) from e
    except RevisionNotFoundError as e:
        raise HubError(f"no revision {ref.revision!r} in {ref.repo_id}", path=subject) from e
    except IncompleteSnapshotError as e:
        raise HubUnavailableError(
            f"the cached snapshot is incomplete and the Hub cannot be reached; {_OFFLINE_HINT}", path=subject
        ) from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, RevisionResolutionError) as e:
        if offline:
            raise HubUnavailableError(f"not a local path, and not in the Hub cache; {_OFFLINE_HINT}",
                                      path=subject) from e
        cause = e.__cause__ or e
        reason = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        raise HubUnavailableError(
            f"the Hub could not be reached ({reason[:200]}) and it is not in the cache", path=subject
        ) from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubError(f"unauthorized (HTTP {status}): {_LOGIN_HINT}, with a token that can access it",
                           path=subject) from e
        raise HubUnavailableError(f"the Hub answered HTTP {status}; try again later", path=subject) from e
