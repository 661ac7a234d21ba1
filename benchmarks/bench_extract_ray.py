"""``extract --executor ray`` against the local executor on one machine: wall time, load, per-module time, bytes.

Builds a llama-shaped sharded bf16 pair (bench_throughput.py's generator, about ``--size-gb`` per side), then runs,
each in its own process, with the page cache warm (the pair was just written or read):

    ray start-up   ``ray.init()`` and ``ray.shutdown()`` on this machine: what ``--executor ray`` pays before any
                   task when it starts Ray itself (without ``--address``)
    local          ``deltakit extract FT BASE -r RANK -q``: one module after another, torch's default threads
    local 1 thread the same with ``OMP_NUM_THREADS=1``: what one Ray task (one CPU) runs with
    ray            ``deltakit extract FT BASE -r RANK -q --executor ray``: a task per module, one CPU each, as many
                   at once as this machine's Ray has CPUs

For each: wall time (process start to exit), the ratio to ``local 1 thread``, the 1-minute load average when it ended, the
summed and the median per-module seconds of its report (ΔW and the SVD, in the process or task that did them), and
whether its adapter file is byte-identical to ``local 1 thread``'s. On one machine Ray adds its start-up and a
process per CPU; a speed-up needs more cores than one process uses, or more machines.

Example:
    python -m benchmarks.bench_extract_ray --size-gb 1 --work /tmp/rayx
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_throughput import build_pair, layers_for, llama_config, llama_shapes  # noqa: E402
from benchmarks.big_checkpoint import REPO  # noqa: E402


def timed(args: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of ``python ARGS`` run from the repository root; SystemExit if it fails."""
    started = time.perf_counter()
    process = subprocess.run([sys.executable, *args], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)} | (env or {}))
    if process.returncode != 0:
        raise SystemExit(f"failed (exit {process.returncode}): python {' '.join(args)}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of each checkpoint (default 1)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--shard-gb", type=float, default=0.25, help="shard size (default 0.25)")
    parser.add_argument("--rank", type=int, default=16, help="extract rank (default 16)")
    parser.add_argument("--work", type=Path, help="working directory (default: a new one under the temp dir)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-extract-ray-"))
    layers = layers_for(args.size_gb * 1e9, args.hidden, args.intermediate, args.vocab)
    if not (work / "finetuned").exists():
        build_pair(work, llama_shapes(args.hidden, args.intermediate, args.vocab, layers),
                   llama_config(args.hidden, args.intermediate, args.vocab, layers), int(args.shard_gb * 1e9))
    size = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
    print(f"pair: {layers} layers, hidden {args.hidden}, {size / 1e9:.2f} GB per side, {os.cpu_count()} CPUs, "
          f"rank {args.rank}")

    rows = [("ray start-up", timed(["-c", "import ray; ray.init(include_dashboard=False); ray.shutdown()"]),
             os.getloadavg()[0], None)]
    extract = ["-m", "deltakit", "extract", str(work / "finetuned"), str(work / "base"), "-r", str(args.rank), "-q",
               "--overwrite"]
    for name, extra, env in [("local", [], None), ("local 1 thread", [], {"OMP_NUM_THREADS": "1"}),
                             ("ray", ["--executor", "ray"], None)]:
        out = work / name.replace(" ", "-")
        seconds = timed([*extract, "-o", str(out), *extra], env)
        rows.append((name, seconds, os.getloadavg()[0], out))

    reference = (work / "local-1-thread" / "adapter_model.safetensors").read_bytes()
    local_seconds = rows[2][1]
    print(f"| run | wall s | / local 1 thread | load (1 min) | modules | module s (sum) | module s (median) | "
          f"bytes = local 1 thread |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, seconds, load, out in rows:
        if out is None:
            print(f"| {name} | {seconds:.1f} | | {load:.1f} | | | | |")
            continue
        modules = [m["seconds"] for m in json.loads((out / "extract_report.json").read_text())["modules"]]
        same = (out / "adapter_model.safetensors").read_bytes() == reference
        print(f"| {name} | {seconds:.1f} | {seconds / local_seconds:.2f} | {load:.1f} | {len(modules)} | "
              f"{sum(modules):.1f} | {statistics.median(modules):.3f} | {'yes' if same else 'no'} |")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
