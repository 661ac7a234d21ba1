"""``deltakit extract --executor ray``: each module's fit a Ray task on a real (local) Ray cluster.

One cluster for the module (``ray.init(num_cpus=2)``, no dashboard, the ``ray_cluster`` fixture). What is checked:
the adapter, its config, the model card and the report (without timings) are byte-identical to the local
executor's with one math thread (a task has one CPU), for a fixed rank on a sharded bf16 pair with carried norms,
for a budget (two phases: the SVDs at the cap come back, the driver allocates), for DoRA with per-module ranks
and a tied head; a worker killed mid-run is retried into the same bytes; an error inside a task is the local
executor's one line, and a worker that cannot see the checkpoint's files says so; what the tasks cannot do is refused in one line before any work, as is a missing Ray.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from builders import ModelPair, low_rank_delta, write_safetensors_pair
from test_batch import _without_seconds

import deltakit
from deltakit.cli import main
from deltakit.errors import CheckpointNotFoundError, NonFiniteError
from deltakit.ops.extract import REPORT_FILE

ray_needed = pytest.mark.usefixtures("ray_cluster", "single_thread")


def _ray_map():
    from deltakit.ops.ray_cluster import RayMap  # imports ray: only where the cluster fixture found it

    return RayMap()


def _outputs(out: Path) -> dict[str, object]:
    """Every output file's bytes, the output's own path (in the report and card) as OUT; the report parsed,
    without its timings."""
    files = {p.name: p.read_bytes().replace(str(out).encode(), b"OUT") for p in sorted(out.iterdir())}
    return files | {REPORT_FILE: _without_seconds(json.loads(files[REPORT_FILE]))}


@ray_needed
@pytest.mark.parametrize(("pair_name", "options"), [
    ("llama_pair_bf16_sharded", {"rank": 4}),
    ("llama_pair_bf16_sharded", {"avg_rank": 3, "svd": "randomized"}),
    ("llama_tied_pair", {"energy": 0.9, "dora": True}),
], ids=["rank", "budget", "dora-energy-tied"])
def test_ray_writes_the_local_executors_bytes(request, tmp_path: Path, pair_name: str, options: dict) -> None:
    pair: ModelPair = request.getfixturevalue(pair_name)
    local = deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "local", **options)
    remote = deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "ray", executor=_ray_map(), **options)
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")
    assert len(remote.modules) == len(local.modules) > 10
    assert any(t.fate == "carried" for t in remote.tensors)  # norms carried by the driver, the same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "ray"]  # no staging or spill left


@ray_needed
def test_the_cli_extracts_on_ray(tmp_path: Path, llama_pair_bf16_sharded: ModelPair) -> None:
    """ray.is_initialized() here: the executor uses the module's cluster and leaves it running."""
    import ray

    pair = llama_pair_bf16_sharded
    for executor in ("local", "ray"):
        main(["extract", str(pair.ft_dir), str(pair.base_dir), "-r", "4", "-o", str(tmp_path / executor),
              "--executor", executor, "-q"])
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local") and ray.is_initialized()


def _killing_once(flag: Path, function, run, module):
    """``function``, except that the first task fitting layer 1's q_proj SIGKILLs its own worker."""
    if module.module.endswith("layers.1.self_attn.q_proj") and not flag.exists():
        flag.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return function(run, module)


@ray_needed
def test_a_worker_killed_mid_run_is_retried_into_the_same_bytes(tmp_path: Path,
                                                                 llama_pair_bf16_sharded: ModelPair) -> None:
    class KillsAWorkerOnce(type(_ray_map())):
        def map(self, function, shared, units, label=str):
            return super().map(functools.partial(_killing_once, tmp_path / "killed", function), shared, units, label)

    pair = llama_pair_bf16_sharded
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "local", rank=4)
    deltakit.extract(pair.ft_dir, pair.base_dir, tmp_path / "ray", rank=4, executor=KillsAWorkerOnce())
    assert (tmp_path / "killed").exists()  # the kill happened
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")


@ray_needed
def test_a_worker_that_cannot_see_the_checkpoint_says_so(tmp_path: Path, llama_pair_bf16_sharded: ModelPair) -> None:
    """As on a node without the shared storage: the files move away once the driver has planned from them."""
    shutil.copytree(llama_pair_bf16_sharded.ft_dir, tmp_path / "ft")

    class MovesTheFilesAway(type(_ray_map())):
        def map(self, function, shared, units, label=str):
            (tmp_path / "ft").rename(tmp_path / "elsewhere")
            return super().map(function, shared, units, label)

    with pytest.raises(CheckpointNotFoundError) as info:
        deltakit.extract(tmp_path / "ft", llama_pair_bf16_sharded.base_dir, tmp_path / "out", rank=4,
                         executor=MovesTheFilesAway())
    assert str(info.value).startswith(f"{tmp_path / 'ft'}/model-0000")
    assert "safetensors: not found on the worker fitting model." in str(info.value)
    assert str(info.value).endswith("every node must see the checkpoints at the same path (shared storage; for a "
                                    "Hub id, a shared HF cache)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


@ray_needed
def test_an_error_inside_a_task_is_the_local_one_line(tmp_path: Path) -> None:
    """A NaN shows only when the worker forms ΔW: the driver raises the task's own error, and writes nothing."""
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    base = {f"{n}.weight": torch.zeros(32, 24) for n in names}
    finetuned = {f"{n}.weight": low_rank_delta(32, 24, 2, seed=i) for i, n in enumerate(names)}
    finetuned[f"{names[2]}.weight"][3, 4] = float("nan")
    base_dir, ft_dir = write_safetensors_pair(tmp_path, base, finetuned, shards=2)
    errors = []
    for name, executor in [("local", None), ("ray", _ray_map())]:
        with pytest.raises(NonFiniteError) as info:
            deltakit.extract(ft_dir, base_dir, tmp_path / name, rank=2, executor=executor)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "\n" not in errors[1] and names[2] in errors[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "finetuned"]


@pytest.mark.parametrize(("option", "line"), [
    (["--calib", "self"], "--calib with --executor ray is not supported: the calibration pass runs the model "
                          "block by block on one machine; extract with the local executor"),
    (["--device", "cuda"], "--device cuda with --executor ray is not supported: each module's fit runs as a task "
                           "on one CPU of a worker; drop --device"),
])
def test_what_the_tasks_cannot_do_is_refused_before_any_work(tmp_path: Path, llama_pair: ModelPair, capsys,
                                                              option: list[str], line: str) -> None:
    pytest.importorskip("ray")
    with pytest.raises(SystemExit) as info:
        main(["extract", str(llama_pair.ft_dir), str(llama_pair.base_dir), "-o", str(tmp_path / "a"),
              "--executor", "ray", *option])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"deltakit: error: {line}"]
    assert list(tmp_path.iterdir()) == []


def test_without_ray_installed_it_is_one_line(tmp_path: Path, llama_pair: ModelPair, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    args = ["extract", str(llama_pair.ft_dir), str(llama_pair.base_dir), "-o", str(tmp_path / "a")]
    with pytest.raises(SystemExit) as info:
        main([*args, "--executor", "ray"])
    assert info.value.code == 3
    assert capsys.readouterr().err.splitlines() == [
        "deltakit: error: --executor ray needs Ray, which is not installed; pip install 'deltakit[ray]'"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--address", "auto"])
    assert info.value.code == 2 and "--address needs --executor ray" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
