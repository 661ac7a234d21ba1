"""Isolation for every test (offline, private HF cache, fixed seed) and session-wide tiny model pairs.

The pair fixtures are built once per session and shared: treat their directories as read-only (copy them
with ``shutil.copytree`` into ``tmp_path`` before changing anything).
"""

from __future__ import annotations

import os
from pathlib import Path

# huggingface_hub and transformers read these once, at import: set them before anything imports either.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import huggingface_hub.constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from builders import ModelPair, MoePair, make_moe_pair, make_pair  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Offline, with an empty private HF cache, and a fixed torch seed, for every test.

    huggingface_hub resolves the cache paths and the offline flag at import, so its constants are patched
    along with the environment.
    """
    hf_home = tmp_path_factory.mktemp("hf_home")
    for name, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_ASSETS_CACHE", str(hf_home / "assets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)


def _pair(tmp_path_factory: pytest.TempPathFactory, name: str, arch: str, **kwargs: object) -> ModelPair:
    return make_pair(tmp_path_factory.mktemp(name), arch, **kwargs)


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> ModelPair:
    """Llama, fp32, one file, untied lm_head (Linear everywhere, RMSNorm, GQA k/v (32, 64))."""
    return _pair(tmp_path_factory, "llama_pair", "llama")


@pytest.fixture(scope="session")
def llama_tied_pair(tmp_path_factory: pytest.TempPathFactory) -> ModelPair:
    """Llama, fp32, ``tie_word_embeddings=True``: no ``lm_head.weight`` in the files (PEFT's tying names)."""
    return _pair(tmp_path_factory, "llama_tied_pair", "llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def llama_pair_bf16_sharded(tmp_path_factory: pytest.TempPathFactory) -> ModelPair:
    """Llama stored in bf16, split into 5 shards (max_shard_size 40KB) with an index."""
    return _pair(tmp_path_factory, "llama_pair_bf16_sharded", "llama", dtype=torch.bfloat16, max_shard_size="40KB")


@pytest.fixture(scope="session")
def qwen2_pair(tmp_path_factory: pytest.TempPathFactory) -> ModelPair:
    """Qwen2, fp32: like llama plus q/k/v_proj biases."""
    return _pair(tmp_path_factory, "qwen2_pair", "qwen2")


@pytest.fixture(scope="session")
def bert_pair(tmp_path_factory: pytest.TempPathFactory) -> ModelPair:
    """BertForMaskedLM, fp32: Linear with biases, LayerNorm, decoder tied to the word embeddings."""
    return _pair(tmp_path_factory, "bert_pair", "bert")


@pytest.fixture(scope="session")
def gpt2_pair(tmp_path_factory: pytest.TempPathFactory) -> ModelPair:
    """GPT-2, fp32: Conv1D (weights stored (in, out)), LayerNorm, lm_head tied to transformer.wte."""
    return _pair(tmp_path_factory, "gpt2_pair", "gpt2")


@pytest.fixture(scope="session")
def mixtral_pair(tmp_path_factory: pytest.TempPathFactory) -> MoePair:
    """Mixtral, fp32, 4 experts per layer, expert 1 unchanged in every layer (block_sparse_moe.experts.E.w1/2/3)."""
    return make_moe_pair(tmp_path_factory.mktemp("mixtral_pair"), "mixtral")


@pytest.fixture(scope="session")
def qwen3_moe_pair(tmp_path_factory: pytest.TempPathFactory) -> MoePair:
    """Qwen3-MoE, fp32, 4 experts per layer, expert 1 unchanged in every layer (mlp.experts.E.gate/up/down_proj)."""
    return make_moe_pair(tmp_path_factory.mktemp("qwen3_moe_pair"), "qwen3_moe")


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster (2 CPUs, no dashboard) for one module of tests: starting Ray takes several seconds.
    Its workers import the deltakit under test and the tests' modules (steps that kill their own worker)."""
    ray = pytest.importorskip("ray")
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture
def single_thread():
    """Local runs with one torch thread, as each Ray task with one CPU has: bytes match for equal threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
