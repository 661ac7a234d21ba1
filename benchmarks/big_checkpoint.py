"""Peak memory and wall time of ``deltakit extract`` and ``deltakit merge`` on a checkpoint bigger than RAM/4.

Builds a synthetic sharded bf16 pair of about ``--size-gb`` GB each (square ``--dim`` x ``--dim`` tensors named
like llama projections, in shards of about ``--shard-gb`` GB, with an index and a config.json). Every fine-tuned
tensor differs from its base by a rank-8 change plus a little noise, so every tensor is factorized and merged.
Then it runs, each in its own process on a warm page cache:

    extract   ``deltakit extract FT BASE -r RANK -o WORK/lora -q``
    merge     ``deltakit merge BASE WORK/lora -o WORK/merged -q``

Each process runs the CLI's ``main`` under :class:`benchmarks.memory.PeakMemory` (RssAnon of its own
``/proc/self/status`` sampled every 20 ms; VmHWM reset after the imports where ``/proc/self/clear_refs`` allows).
RssAnon (heap, tensors) is what streaming must bound; VmHWM (peak RSS) also counts the pages of the memory-mapped
checkpoints, which the kernel can drop at will. The table gives both, and peak RssAnon against the largest
tensor: absolute, and above the process's RssAnon once the interpreter and torch are loaded.

The generated files are deleted at the end unless ``--keep`` (with ``--work``, only those). Needs about
3 x ``--size-gb`` GB of free disk.

Example:
    python -m benchmarks.big_checkpoint --size-gb 6.5 --work /tmp/big-checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.io.writer import SafetensorsWriter

REPO = Path(__file__).resolve().parents[1]
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
CHANGE_RANK = 8

# Runs in the measured process: the CLI's main under PeakMemory, results as JSON to argv[1].
_CHILD = """
import json, sys
from benchmarks.memory import PeakMemory
from deltakit.cli import main
code = 0
with PeakMemory(interval_s=0.02) as peak:
    try:
        main(sys.argv[2:])
    except SystemExit as e:
        code = e.code
with open(sys.argv[1], "w") as file:
    json.dump({"anon_start": peak.anon_start_bytes, "anon_peak": peak.anon_peak_bytes, "hwm": peak.hwm_bytes,
               "hwm_reset": peak.hwm_reset}, file)
sys.exit(code)
"""


@dataclass
class CheckpointFacts:
    """Sizes of one of the two generated checkpoints."""

    model_bytes: int
    largest_bytes: int  # stored (bf16)
    largest_numel: int
    tensors: int
    shards: int


@dataclass
class Measured:
    """One command's run."""

    name: str
    seconds: float
    hwm_bytes: int  # peak RSS (VmHWM) since the command started
    hwm_reset: bool  # False: VmHWM counts since the process started (imports included)
    anon_start_bytes: int  # RssAnon with the interpreter, torch and deltakit loaded
    anon_peak_bytes: int


def build_pair(root: Path, *, size_bytes: int, dim: int, shard_bytes: int,
               seed: int = 0) -> tuple[Path, Path, CheckpointFacts]:
    """Write ``root/base`` and ``root/finetuned``: bf16 (dim, dim) tensors, about ``size_bytes`` each.

    Args:
        root: parent directory (created if missing; ``base`` and ``finetuned`` must not exist).
        size_bytes: target size of each checkpoint (at least one tensor).
        dim: side of every (square) tensor.
        shard_bytes: target size of a shard (at least one tensor per shard).
        seed: seed of every random tensor.

    Returns:
        ``(base_dir, ft_dir, facts)``.
    """
    tensor_bytes = dim * dim * 2
    count = max(1, size_bytes // tensor_bytes)
    names = [f"model.layers.{i // len(PROJECTIONS)}.{PROJECTIONS[i % len(PROJECTIONS)]}.weight" for i in range(count)]
    per_shard = max(1, shard_bytes // tensor_bytes)
    shards = [names[i : i + per_shard] for i in range(0, count, per_shard)]
    base_dir, ft_dir = root / "base", root / "finetuned"
    for ckpt_dir in (base_dir, ft_dir):
        ckpt_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for k, shard in enumerate(shards):
        file_name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        specs = [(name, torch.bfloat16, (dim, dim)) for name in shard]
        with SafetensorsWriter(base_dir / file_name, specs, {"format": "pt"}) as base_writer, \
                SafetensorsWriter(ft_dir / file_name, specs, {"format": "pt"}) as ft_writer:
            for name in shard:
                base = 0.02 * torch.randn(dim, dim, generator=generator)
                # A fine-tune-like change: low rank, about 10% of the weight's norm, plus noise at 1%.
                left = torch.randn(dim, CHANGE_RANK, generator=generator)
                right = torch.randn(CHANGE_RANK, dim, generator=generator)
                finetuned = base + (0.002 / CHANGE_RANK**0.5) * (left @ right)
                finetuned += 0.0002 * torch.randn(dim, dim, generator=generator)
                base_writer.write(name, base.to(torch.bfloat16))
                ft_writer.write(name, finetuned.to(torch.bfloat16))
        weight_map |= dict.fromkeys(shard, file_name)
    index = {"metadata": {"total_size": count * tensor_bytes}, "weight_map": weight_map}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16"}
    for ckpt_dir in (base_dir, ft_dir):
        (ckpt_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (ckpt_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    facts = CheckpointFacts(count * tensor_bytes, tensor_bytes, dim * dim, count, len(shards))
    return base_dir, ft_dir, facts


def run_measured(name: str, cli_args: list[str], work: Path, checkout: Path = REPO) -> Measured:
    """Run ``deltakit CLI_ARGS`` in a fresh process under PeakMemory; raise SystemExit if it fails.

    Args:
        name: label of the run.
        cli_args: the arguments after ``deltakit``.
        work: a directory for the process's result file.
        checkout: the repository whose ``deltakit`` (and ``benchmarks.memory``) the process imports.

    Returns:
        Wall time (process start to exit, imports included) and the memory peaks.
    """
    os.sync()  # no dirty pages of the build or an earlier run left to throttle this one
    result_path = work / f"{name}.memory.json"
    started = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(checkout)}
    process = subprocess.run([sys.executable, "-c", _CHILD, str(result_path), *cli_args], cwd=checkout, env=env)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{name} failed (exit {process.returncode}): deltakit {' '.join(cli_args)}")
    peaks = json.loads(result_path.read_text())
    result_path.unlink()
    return Measured(name, seconds, peaks["hwm"], peaks["hwm_reset"], peaks["anon_start"], peaks["anon_peak"])


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(facts: CheckpointFacts, runs: list[Measured]) -> list[str]:
    """The results as Markdown table lines."""
    lines = [
        "| command | model size | largest tensor | wall s | peak RSS (VmHWM) | peak RssAnon | RssAnon at start "
        "| peak RssAnon / largest | (peak − start) / largest |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {facts.model_bytes / 1e9:.2f} GB ({facts.tensors} tensors, {facts.shards} shards) "
            f"| {_mib(facts.largest_bytes)} | {run.seconds:.1f} | {_mib(run.hwm_bytes)}"
            f"{'' if run.hwm_reset else ' (since start)'} | {_mib(run.anon_peak_bytes)} "
            f"| {_mib(run.anon_start_bytes)} | {run.anon_peak_bytes / facts.largest_bytes:.1f} "
            f"| {(run.anon_peak_bytes - run.anon_start_bytes) / facts.largest_bytes:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=6.5, help="size of each checkpoint (default 6.5)")
    parser.add_argument("--dim", type=int, default=4096, help="side of every square tensor (default 4096)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size (default 2)")
    parser.add_argument("--rank", type=int, default=16, help="extract rank (default 16)")
    parser.add_argument("--work", type=Path, help="working directory (default: a new one under the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints and outputs")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="deltakit-big-"))
    work.mkdir(parents=True, exist_ok=True)
    generated = [work / name for name in ("base", "finetuned", "lora", "merged")] if args.work else [work]
    needed = 3.1 * args.size_gb * 1e9  # base, fine-tune, merged (+ the adapter)
    free = shutil.disk_usage(work).free
    if free < needed:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, about {needed / 1e9:.1f} GB needed")
    try:
        started = time.perf_counter()
        base_dir, ft_dir, facts = build_pair(work, size_bytes=int(args.size_gb * 1e9), dim=args.dim,
                                             shard_bytes=int(args.shard_gb * 1e9))
        print(f"built 2 x {facts.model_bytes / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        lora, merged = work / "lora", work / "merged"
        runs = [
            run_measured("extract", ["extract", str(ft_dir), str(base_dir), "-r", str(args.rank), "-o", str(lora),
                                     "-q"], work),
            run_measured("merge", ["merge", str(base_dir), str(lora), "-o", str(merged), "-q"], work),
        ]
        summary = json.loads((lora / "extract_report.json").read_text())["summary"]
        print(f"extract: {summary['modules_factorized']} modules, rank {args.rank}, mean relative error "
              f"{summary['mean_relative_error']:.4f}; merged shards: "
              f"{len(list(merged.glob('*.safetensors')))} of {facts.shards}", file=sys.stderr)
        print("\n".join(table(facts, runs)))
    finally:
        if not args.keep:
            for path in generated:  # never a --work directory itself: it may hold other things
                shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
