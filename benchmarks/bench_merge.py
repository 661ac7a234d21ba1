"""Wall time and peak memory of ``deltakit merge`` vs a plain ``cp -r`` of the base vs PEFT's merge path.

Builds (unless given) a sharded llama-shaped bf16 checkpoint of about ``--size-gb`` GB (hidden 2048, intermediate
5632, vocabulary 32000, as many layers as fit) and a rank-16 LoRA adapter on every linear module (or on
``--targets``), then runs, each in its own process, one after the other on a warm page cache:

    cp -r       ``cp -r BASE OUT``
    deltakit    ``deltakit.merge.merge(BASE, [ADAPTER], OUT)`` (streams tensor by tensor, fsyncs every shard)
    baseline    the same with the ``deltakit`` package of another checkout (``--baseline``), e.g. a
                ``git worktree`` of the commit before a change: before and after, timed in the same run
    peft        ``AutoModelForCausalLM.from_pretrained(BASE, dtype=bf16)`` → ``PeftModel.from_pretrained`` →
                ``merge_and_unload()`` → ``save_pretrained(OUT, max_shard_size=...)``

Each run starts after ``sync`` (no dirty pages of an earlier run to throttle it). Memory is measured from outside:
peak RSS is GNU time's ``%M`` (the command's ``ru_maxrss``; it counts the file pages a process maps, which is how
safetensors loads), peak anonymous RSS is ``RssAnon`` from ``/proc/PID/status`` sampled every 5 ms. deltakit
fsyncs every file it writes; ``cp -r + sync`` is the copy with the same durability. Each command runs
``--repeat`` times, interleaved; the table shows the median time and the largest memory peak. Targets (issue 4):
deltakit ≤ 2 × the copy's time, and ≤ 1/4 of PEFT's peak RSS.

Example:
    python benchmarks/bench_merge.py --size-gb 2 --work /tmp/bench-merge
    python benchmarks/bench_merge.py --work /tmp/bench-merge --targets q_proj,v_proj --baseline /tmp/old-checkout
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deltakit.io.writer import SafetensorsWriter  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 2048, 5632, 32000, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def layer_shapes(i: int, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> dict[str, tuple[int, ...]]:
    """The tensors of llama decoder layer ``i``, in file order (multi-head attention: k/v as wide as q)."""
    p = f"model.layers.{i}"
    return {
        f"{p}.input_layernorm.weight": (hidden,),
        f"{p}.self_attn.q_proj.weight": (hidden, hidden),
        f"{p}.self_attn.k_proj.weight": (hidden, hidden),
        f"{p}.self_attn.v_proj.weight": (hidden, hidden),
        f"{p}.self_attn.o_proj.weight": (hidden, hidden),
        f"{p}.post_attention_layernorm.weight": (hidden,),
        f"{p}.mlp.gate_proj.weight": (intermediate, hidden),
        f"{p}.mlp.up_proj.weight": (intermediate, hidden),
        f"{p}.mlp.down_proj.weight": (hidden, intermediate),
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_base(base_dir: Path, size_gb: float, shard_gb: float) -> None:
    """Write a llama-shaped bf16 checkpoint of about ``size_gb`` GB in shards of about ``shard_gb`` GB."""
    per_layer = sum(_numel(s) for s in layer_shapes(0).values()) * 2
    layers = max(1, round((size_gb * 1e9 - 2 * VOCAB * HIDDEN * 2) / per_layer))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes |= layer_shapes(i)
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}

    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = _numel(shape) * 2
        if shards[-1] and size + nbytes > shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    base_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, names in enumerate(shards):
        file_name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        specs = [(n, torch.bfloat16, shapes[n]) for n in names]
        with SafetensorsWriter(base_dir / file_name, specs, {"format": "pt"}) as writer:
            for name in names:
                if len(shapes[name]) == 1:
                    writer.write(name, torch.ones(shapes[name], dtype=torch.bfloat16))
                else:
                    writer.write(name, (0.02 * torch.randn(shapes[name], generator=generator)).to(torch.bfloat16))
        weight_map |= dict.fromkeys(names, file_name)
    total = sum(_numel(s) * 2 for s in shapes.values())
    (base_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "dtype": "bfloat16",
    }
    (base_dir / "config.json").write_text(json.dumps(config, indent=2))


def build_adapter(adapter_dir: Path, config: dict, rank: int, targets: list[str]) -> None:
    """A PEFT LoRA adapter (r=rank, alpha=2r) on the ``targets`` modules of every layer, fp32 factors, ‖ΔW‖ small."""
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for name, shape in layer_shapes(i).items():
            module = name.removesuffix(".weight")
            if module.rsplit(".", 1)[1] not in targets:
                continue
            out, inp = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=generator) / inp**0.5
            tensors[f"base_model.model.{module}.lora_B.weight"] = 1e-3 * torch.randn(out, rank, generator=generator)
    adapter_dir.mkdir(parents=True)
    save_file(tensors, adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
    }, indent=2))


@dataclass
class Run:
    name: str
    seconds: float  # wall
    cpu_seconds: float  # user + system
    peak_rss: int  # bytes: GNU time's %M (ru_maxrss of the command)
    peak_anon: int  # bytes: sampled RssAnon


def _descendants(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in children] + [d for c in children for d in _descendants(int(c))]


def _sample_anon(pid: int, peak: list[int], done: threading.Event) -> None:
    while not done.is_set():
        for child in _descendants(pid):
            try:
                for line in Path(f"/proc/{child}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                pass
        time.sleep(0.005)


def measure(name: str, command: list[str], work: Path, cwd: Path) -> Run:
    """Run ``command`` under GNU time (so ru_maxrss is the command's own, not inherited from this big process)."""
    subprocess.run(["sync"], check=True)  # no dirty pages from earlier runs left to throttle this one
    stats = work / "time.txt"
    started = time.perf_counter()
    child = subprocess.Popen(["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(stats), *command], cwd=cwd)
    peak, done = [0], threading.Event()
    sampler = threading.Thread(target=_sample_anon, args=(child.pid, peak, done), daemon=True)
    sampler.start()
    code = child.wait()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"{name} failed: {command}")
    _, user, system, max_kb = stats.read_text().split()[-4:]
    return Run(name, seconds, float(user) + float(system), int(max_kb) * 1024, peak[0])


def _median(runs: list[Run]) -> Run:
    """The run with the median wall time, with the largest memory peaks seen over all repeats."""
    middle = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    return Run(middle.name, middle.seconds, middle.cpu_seconds, max(r.peak_rss for r in runs),
               max(r.peak_anon for r in runs))


_DELTAKIT = """
import sys
from deltakit.ops.merge import merge
report = merge(sys.argv[1], [sys.argv[2]], sys.argv[3])
print(report.seconds, file=open(sys.argv[4], "a"))
"""
_PEFT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload()
merged.save_pretrained(sys.argv[3], max_shard_size=sys.argv[4])
"""


def _read_all(directory: Path) -> None:
    """Read every file once so that all runs start from the same warm page cache."""
    for path in directory.iterdir():
        with open(path, "rb") as file:
            while file.read(1 << 24):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of the synthetic base (default 2)")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the synthetic base (default 1)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated modules the synthetic adapter targets (default: every linear one)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, deleted after)")
    parser.add_argument("--base", type=Path, help="use this checkpoint instead of building one (needs --adapter)")
    parser.add_argument("--adapter", type=Path, help="the adapter to merge into --base")
    parser.add_argument("--baseline", type=Path, help="also time the deltakit package of this checkout")
    parser.add_argument("--skip-peft", action="store_true", help="do not run PEFT's path")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command; the median is shown")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for deltakit and PEFT (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the children

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, adapter = args.base, args.adapter
        if base is None:
            targets = args.targets.split(",")
            base, adapter = work / "base", work / f"adapter-r{args.rank}-{'-'.join(targets)}"
            if not base.exists():
                print(f"building a ~{args.size_gb:g} GB base in {base} ...", file=sys.stderr)
                build_base(base, args.size_gb, args.shard_gb)
            if not adapter.exists():
                build_adapter(adapter, json.loads((base / "config.json").read_text()), args.rank, targets)
        base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        _read_all(base)

        copy_dir = work / "copy"
        # (name, command, working directory: the checkout whose deltakit is imported)
        commands = [
            ("cp -r", ["cp", "-r", str(base), str(copy_dir)], REPO),
            ("cp -r + sync (durable, like deltakit)", ["sh", "-c", f'cp -r "{base}" "{copy_dir}" && sync'], REPO),
        ]
        checkouts = [("deltakit merge", REPO)]
        if args.baseline is not None:
            checkouts.append((f"deltakit merge ({args.baseline.name})", args.baseline.resolve()))
        for name, checkout in checkouts:
            seconds_path = work / f"merge-seconds-{len(commands)}.txt"
            seconds_path.unlink(missing_ok=True)
            commands.append((name, [sys.executable, "-c", _DELTAKIT, str(base), str(adapter), str(work / "merged"),
                                    str(seconds_path)], checkout))
        if not args.skip_peft:
            commands.append(("peft merge_and_unload + save_pretrained",
                             [sys.executable, "-c", _PEFT, str(base), str(adapter), str(work / "peft"),
                              f"{int(args.shard_gb * 1000)}MB"], REPO))
        rounds: list[list[Run]] = []
        for _ in range(args.repeat):  # interleaved, so that a busy moment does not hit one command only
            rounds.append([])
            for name, command, cwd in commands:
                rounds[-1].append(measure(name, command, work, cwd))
                for out in (copy_dir, work / "merged", work / "peft"):
                    shutil.rmtree(out, ignore_errors=True)
        runs = [_median(list(same)) for same in zip(*rounds)]

        copy = runs[0]
        print(f"\nbase: {base_bytes / 1e9:.2f} GB in {len(list(base.glob('*.safetensors')))} shards; adapter "
              f"{adapter.name}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; torch {torch.__version__}; "
              f"warm page cache, sync before each run; median of {args.repeat} runs\n")
        print(f"| {'run':<40} | {'wall s':>7} | {'× cp':>6} | {'merge() s':>9} | {'× cp':>6} | {'CPU s':>6} | "
              f"{'peak RSS MB':>11} | {'peak RssAnon MB':>15} |")
        print(f"|{'-' * 42}|{'-' * 9}|{'-' * 8}|{'-' * 11}|{'-' * 8}|{'-' * 8}|{'-' * 13}|{'-' * 17}|")
        for k, run in enumerate(runs):
            seconds_path = work / f"merge-seconds-{k}.txt"
            if seconds_path.exists():  # merge()'s own time, without starting Python and importing torch
                in_process = sorted(float(x) for x in seconds_path.read_text().split())[args.repeat // 2]
                merge_columns = f"{in_process:9.2f} | {in_process / copy.seconds:6.2f}"
            else:
                merge_columns = f"{'':9} | {'':6}"
            print(f"| {run.name:<40} | {run.seconds:7.2f} | {run.seconds / copy.seconds:6.2f} | {merge_columns} | "
                  f"{run.cpu_seconds:6.2f} | {run.peak_rss / 1e6:11.0f} | {run.peak_anon / 1e6:15.0f} |")
        ours = runs[2]
        print(f"\ndeltakit / cp -r time: {ours.seconds / copy.seconds:.2f} (target <= 2); "
              f"deltakit / (cp -r + sync) time: {ours.seconds / runs[1].seconds:.2f}")
        if not args.skip_peft:
            peft = runs[-1]
            print(f"deltakit / peft peak RSS: {ours.peak_rss / peft.peak_rss:.3f} (target <= 0.25); "
                  f"deltakit / peft time: {ours.seconds / peft.seconds:.2f}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
