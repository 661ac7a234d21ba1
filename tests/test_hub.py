"""Hub ids resolve through a real huggingface_hub cache, laid out on disk by the test, without the network.

The cache is built the way huggingface_hub 2.4 writes it (``file_download.py``, ``_snapshot_download.py``,
``_tree_cache.py``): ``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` as relative symlinks to
the blobs, ``refs/<branch or tag>`` holding the commit, and, when an online ``snapshot_download`` made it,
``trees/<commit>.json``, the repository's listing. huggingface_hub's shared HTTP client is replaced, for every
test here, by one that records and refuses any request: no test may reach, or even try to reach, the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx2
import huggingface_hub.constants
import huggingface_hub.utils._detect_agent as hub_detect_agent
import huggingface_hub.utils._http as hub_http
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save

from deltakit.io import hub
from deltakit.io.checkpoint import open_checkpoint
from deltakit.errors import HubError, HubUnavailableError

COMMIT = hashlib.sha1(b"main").hexdigest()
OLD_COMMIT = hashlib.sha1(b"v1").hexdigest()
CONFIG = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}).encode()


def _weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=generator),
            "model.norm.weight": torch.randn(4, generator=generator)}


def seed_repo(
    repo_id: str, commit: str, files: dict[str, bytes], *, refs: tuple[str, ...] = ("main",),
    listing: dict[str, bytes] | None = None,
) -> Path:
    """Put ``files`` into the huggingface_hub cache as the snapshot of ``repo_id`` at ``commit``.

    Args:
        repo_id: ``org/name``.
        commit: the 40-hex commit.
        files: repo path -> content, stored as blobs and linked from the snapshot.
        refs: branch or tag names written to ``refs/`` as pointing at ``commit``.
        listing: when given, the repository's full listing (path -> content) cached as ``trees/<commit>.json``,
            as an online ``snapshot_download`` leaves it; it may name files that are not in ``files``.

    Returns:
        The snapshot folder.
    """
    repo_dir = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshot_dir = repo_dir / "snapshots" / commit
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot_dir / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)  # huggingface_hub writes no trailing newline
    if listing is not None:
        tree = {"format_version": 1, "files": {
            path: {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()} for path, data in listing.items()
        }}
        (repo_dir / "trees").mkdir(parents=True, exist_ok=True)
        (repo_dir / "trees" / f"{commit}.json").write_text(json.dumps(tree))
    return snapshot_dir


class _NoNetworkClient:
    """Stands in for huggingface_hub's shared httpx client: any use of it is recorded and refused."""

    def __init__(self, attempts: list[str]) -> None:
        self._attempts = attempts

    def close(self) -> None:  # huggingface_hub closes the old client when the factory changes
        pass

    def __getattr__(self, name: str):
        self._attempts.append(name)
        raise AssertionError(f"network call attempted (client.{name})")


@pytest.fixture(autouse=True)
def network_attempts(monkeypatch: pytest.MonkeyPatch):
    """Every request huggingface_hub makes goes through ``get_session()``; make that client refuse them all."""
    attempts: list[str] = []
    monkeypatch.setattr(hub_http, "_GLOBAL_CLIENT_FACTORY", lambda: _NoNetworkClient(attempts))
    monkeypatch.setattr(hub_http, "_GLOBAL_CLIENT", None)
    yield attempts
    assert attempts == [], "a network call was attempted"


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's online mode (the network client still refuses every request).

    Online, huggingface_hub fetches an "agent harnesses" registry once per process to build its user-agent
    header; it is preset empty here so that any request left is one the resolver caused.
    """
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})


@pytest.fixture
def cached_llama() -> Path:
    """org/tiny-llama in the cache: main → COMMIT, tag v1 → OLD_COMMIT, each a config and one safetensors file."""
    seed_repo("org/tiny-llama", OLD_COMMIT, {"config.json": CONFIG, "model.safetensors": save(_weights(1))},
              refs=("v1",))
    return seed_repo("org/tiny-llama", COMMIT, {"config.json": CONFIG, "model.safetensors": save(_weights(0))})


@pytest.mark.parametrize("text", ["org/tiny-llama", "org/tiny-llama@main", f"org/tiny-llama@{COMMIT}"])
def test_ids_with_and_without_revision_resolve_offline_to_the_cached_snapshot(cached_llama: Path, text: str) -> None:
    resolved = hub.resolve(text, kind="checkpoint")
    assert resolved.local_dir == cached_llama
    assert (resolved.repo_id, resolved.commit_hash) == ("org/tiny-llama", COMMIT)
    assert resolved.revision_requested == (text.partition("@")[2] or None)
    assert resolved.pinned == f"org/tiny-llama@{COMMIT}"
    ckpt = open_checkpoint(resolved.local_dir)
    assert torch.equal(ckpt.get("model.norm.weight"), _weights(0)["model.norm.weight"])
    assert hub.resolve_commit(text) == COMMIT


def test_a_tag_pins_its_own_commit(cached_llama: Path) -> None:
    resolved = hub.resolve("org/tiny-llama@v1", kind="checkpoint")
    assert resolved.commit_hash == OLD_COMMIT and resolved.local_dir.name == OLD_COMMIT
    assert torch.equal(open_checkpoint(resolved.local_dir).get("model.norm.weight"), _weights(1)["model.norm.weight"])


@pytest.mark.parametrize("text", ["org/not-cached", "org/tiny-llama@dev", f"org/tiny-llama@{'0' * 40}"])
def test_offline_and_not_cached_is_one_clear_line(cached_llama: Path, text: str) -> None:
    with pytest.raises(HubUnavailableError) as info:
        hub.resolve(text, kind="checkpoint")
    assert str(info.value) == (f"{text}: not a local path, and not in the Hub cache; run once online, "
                               "or unset HF_HUB_OFFLINE")
    assert info.value.exit_code == 3


def test_offline_and_not_cached_commit_lookup_is_the_same_error() -> None:
    with pytest.raises(HubUnavailableError, match="^org/not-cached: not a local path, and not in the Hub cache; "):
        hub.resolve_commit("org/not-cached")


def test_offline_prefers_cached_safetensors_and_never_asks_for_bin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both formats in the cache: only safetensors files are requested from huggingface_hub."""
    seed_repo("org/both", COMMIT, {
        "config.json": CONFIG, "model.safetensors": save(_weights(0)),
        "pytorch_model.bin": b"not read", "pytorch_model.bin.index.json": b"{}",
    })
    requested = _record_requested_files(monkeypatch)
    resolved = hub.resolve("org/both", kind="checkpoint")
    assert requested and not [name for name in requested if ".bin" in name]
    assert "model.safetensors" in requested
    assert open_checkpoint(resolved.local_dir).files == (resolved.local_dir / "model.safetensors",)


def test_offline_without_safetensors_uses_the_cached_bin(monkeypatch: pytest.MonkeyPatch) -> None:
    state = _weights(0)
    path = Path(os.environ["HF_HOME"]) / "pytorch_model.bin"
    torch.save(state, path)
    seed_repo("org/legacy", COMMIT, {"config.json": CONFIG, "pytorch_model.bin": path.read_bytes()})
    requested = _record_requested_files(monkeypatch)
    resolved = hub.resolve("org/legacy", kind="checkpoint")
    assert "pytorch_model.bin" in requested
    assert torch.equal(open_checkpoint(resolved.local_dir).get("model.norm.weight"), state["model.norm.weight"])


def test_online_listing_chooses_safetensors_and_only_the_indexed_shards(online: None, monkeypatch) -> None:
    """The repo also has .bin weights and a consolidated.safetensors (Mistral's layout); neither is fetched.

    Online, the choice comes from the repository listing that snapshot_download caches (trees/<commit>.json).
    Every file the resolver asks for is already in the cache, so no request is needed: any attempt to
    fetch the unwanted files would reach the refusing client and fail the test.
    """
    weights = _weights(0)
    shard_1 = save({"model.norm.weight": weights["model.norm.weight"]})
    shard_2 = save({"model.layers.0.mlp.up_proj.weight": weights["model.layers.0.mlp.up_proj.weight"]})
    index = json.dumps({"metadata": {}, "weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "model.layers.0.mlp.up_proj.weight": "model-00002-of-00002.safetensors",
    }}).encode()
    cached = {"config.json": CONFIG, "model.safetensors.index.json": index,
              "model-00001-of-00002.safetensors": shard_1, "model-00002-of-00002.safetensors": shard_2}
    listing = {**cached, "consolidated.safetensors": b"x" * 10, "pytorch_model.bin": b"x" * 10,
               "pytorch_model.bin.index.json": b"{}", "onnx/config.json": b"{}", "README.md": b"card"}
    snapshot_dir = seed_repo("org/sharded", COMMIT, cached, listing=listing)
    requested = _record_requested_files(monkeypatch)
    resolved = hub.resolve(f"org/sharded@{COMMIT}", kind="checkpoint")
    assert resolved.local_dir == snapshot_dir
    assert set(requested) - set(hub.CHECKPOINT_FILES) == {
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    ckpt = open_checkpoint(resolved.local_dir)
    assert torch.equal(ckpt.get("model.layers.0.mlp.up_proj.weight"), weights["model.layers.0.mlp.up_proj.weight"])


def test_offline_missing_shard_names_it() -> None:
    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                       "b": "model-00002-of-00002.safetensors"}}).encode()
    seed_repo("org/partial", COMMIT, {"model.safetensors.index.json": index,
                                      "model-00001-of-00002.safetensors": save({"a": torch.ones(2)})})
    with pytest.raises(HubUnavailableError) as info:
        hub.resolve("org/partial", kind="checkpoint")
    assert str(info.value) == (f"org/partial: the cached snapshot at commit {COMMIT} lacks "
                               "model-00002-of-00002.safetensors; run once online, or unset HF_HUB_OFFLINE")


def test_offline_ignores_missing_optional_files_that_the_cached_listing_names() -> None:
    """An earlier download cached the listing but not the tokenizer; the weights suffice to resolve."""
    files = {"config.json": CONFIG, "model.safetensors": save(_weights(0))}
    seed_repo("org/no-tokenizer", COMMIT, files, listing={**files, "tokenizer.json": b"{}"})
    assert hub.resolve("org/no-tokenizer", kind="checkpoint").commit_hash == COMMIT


def test_adapter_kind_fetches_the_adapter_files_and_requires_its_weights(monkeypatch) -> None:
    seed_repo("org/adapter", COMMIT, {"adapter_config.json": b"{}", "adapter_model.safetensors": save(_weights(0))})
    requested = _record_requested_files(monkeypatch)
    resolved = hub.resolve("org/adapter", kind="adapter")
    assert set(requested) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert (resolved.local_dir / "adapter_model.safetensors").is_file()
    seed_repo("org/adapter-bin", COMMIT, {"adapter_config.json": b"{}", "adapter_model.bin": b"x"})
    with pytest.raises(HubUnavailableError, match="^org/adapter-bin: the cached snapshot at commit .* lacks "
                                                  "adapter_model.safetensors"):
        hub.resolve("org/adapter-bin", kind="adapter")


def _http_error(cls: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/name")
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(("raised", "expected_type", "message"), [
    (_http_error(RepositoryNotFoundError, 404), HubError,
     "org/name@dev: not a local path, and no such repository on the Hub (if it is private, log in with "
     "`hf auth login` or set HF_TOKEN)"),
    (_http_error(GatedRepoError, 403), HubError,
     "org/name@dev: gated repository: accept its terms at https://huggingface.co/org/name and log in with "
     "`hf auth login` or set HF_TOKEN"),
    (_http_error(RevisionNotFoundError, 404), HubError, "org/name@dev: no revision 'dev' in org/name"),
    (_http_error(HfHubHTTPError, 401), HubError,
     "org/name@dev: unauthorized (HTTP 401): log in with `hf auth login` or set HF_TOKEN, with a token that can "
     "access it"),
    (_http_error(HfHubHTTPError, 503), HubUnavailableError, "org/name@dev: the Hub answered HTTP 503; try again later"),
])
def test_hub_answers_become_one_line_errors(online: None, monkeypatch: pytest.MonkeyPatch, raised: Exception,
                                            expected_type: type, message: str) -> None:
    """The download boundary is stubbed to raise what huggingface_hub raises for each Hub answer."""
    def refuse(*args: object, **kwargs: object) -> str:
        raise raised

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(expected_type) as info:
        hub.resolve("org/name@dev", kind="checkpoint")
    assert type(info.value) is expected_type and str(info.value) == message
    assert info.value.__cause__ is raised


@pytest.mark.parametrize(("text", "expected"), [
    ("org/name", hub.HubRef("org/name")),
    ("org/name@main", hub.HubRef("org/name", "main")),
    ("org/name@refs/pr/1", hub.HubRef("org/name", "refs/pr/1")),
    (f"Org-1/name_2.v3@{COMMIT}", hub.HubRef("Org-1/name_2.v3", COMMIT)),
])
def test_parse_hub_id(text: str, expected: hub.HubRef) -> None:
    assert hub.parse_hub_id(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["name", "a/b/c", "org/na--me", "org/name.git", "org/name@", "./model", "/abs/dir",
                                  "org/-name", "org/"])
def test_malformed_ids_are_refused(text: str) -> None:
    with pytest.raises(HubError):
        hub.parse_hub_id(text)
    assert not hub.is_hub_id(text)


def test_an_existing_local_path_is_never_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_id("out/model")
    (tmp_path / "out" / "model").mkdir(parents=True)
    assert not hub.is_hub_id("out/model")
    assert not hub.is_hub_id(Path("org/name"))


class _FakeApi:
    """Records the two calls push makes instead of sending them (the network boundary of push)."""

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs: object) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs: object):
        self.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/{COMMIT}"})


def test_push_creates_a_private_repo_and_uploads_the_folder(online: None, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """HfApi is replaced by a recording fake: the two calls are the network boundary of push."""
    monkeypatch.setattr(_FakeApi, "calls", [])
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    url = hub.push(tmp_path, "org/out")
    assert url == f"https://huggingface.co/org/out/commit/{COMMIT}"
    assert _FakeApi.calls == [
        ("create_repo", {"repo_id": "org/out", "private": True, "exist_ok": True}),
        ("upload_folder",
         {"folder_path": str(tmp_path), "repo_id": "org/out", "commit_message": "Upload with deltakit"}),
    ]
    with pytest.raises(HubError, match="push to a repository, not a revision"):
        hub.push(tmp_path, "org/out@main")


def _record_requested_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Wrap snapshot_download to record the file names the resolver asks for (patterns are exact names)."""
    requested: list[str] = []
    real = huggingface_hub.snapshot_download

    def recording(repo_id: str, **kwargs):
        requested.extend(p.replace("[", "").replace("]", "") for p in kwargs["allow_patterns"])
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    return requested


def test_push_refuses_offline_before_any_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_FakeApi, "calls", [])
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    with pytest.raises(HubUnavailableError) as info:
        hub.push(tmp_path, "org/out")
    assert str(info.value) == "org/out: cannot upload while HF_HUB_OFFLINE is set; unset it to push"
    assert _FakeApi.calls == []
