"""One big checkpoint against the machine's floors: extract and merge next to the I/O, compute and import floors.

Builds a llama-shaped sharded bf16 pair (hidden ``--hidden``, MLP ``--intermediate``, vocabulary ``--vocab``, as
many layers as fit ``--size-gb`` per side, or ``--layers``), generated and written tensor by tensor so that no
checkpoint is ever held in memory. The fine-tune changes every tensor: a rank-8 change of about 10% of the
weight's norm plus noise at 1% (2-D), a small shift (norms). Then it measures, in one run:

    import floor   a process that imports what ``deltakit extract`` and ``merge`` import, then exits (interpreter
                   start, torch, teardown): what every command pays before and after its work; median of 3
    I/O floor      every weight file of both checkpoints read once, 16 MiB at a time: cold (page cache dropped
                   first) and warm (right after; only meaningful when both fit the page cache); and cold with
                   O_DIRECT, 64 MiB at a time, where the OS has it. The floor is the faster of the two cold reads
    compute floor  per factorized module, ΔW in fp32 and its truncated SVD at ``--rank``, exactly as extract does
                   them (``DeltaBuffer``, ``truncated_svd``), on tensors read beforehand (untimed), summed; and
                   the same again while another thread reads both checkpoints past the page cache, as extract's
                   read-ahead does (where the disk's interrupts and transfers slow the cores, this is slower)
    extract        ``deltakit extract FT BASE -r RANK -o OUT -q`` in its own process, cold
    copy           ``cp -r BASE COPY && sync``, cold: a durable copy, as deltakit fsyncs what it writes
    merge          ``deltakit merge BASE ADAPTER -o OUT -q`` of the extracted adapter, cold
    peft           PEFT's ``merge_and_unload`` + ``save_pretrained`` of the same adapter, cold (bench_merge.py's
                   script; ``--skip-peft`` to leave it out, e.g. where the model does not fit in memory)
    baseline       with ``--baseline DIR``, extract and merge of another checkout's deltakit, for before/after

"Cold" drops the page cache first (``/proc/sys/vm/drop_caches``, which needs root; otherwise
``posix_fadvise(DONTNEED)`` on every input file, which drops only these files' clean pages). The table gives each
step's wall time, its throughput over the bytes it reads, the 1-minute load average when it ended, and for the
deltakit processes the peak anonymous memory above their start. Targets (issue 13), net of the import floor:
extract ≤ 1.2 × max(I/O floor cold, compute floor); merge ≤ 1.5 × the durable copy.

Needs about 3.1 × ``--size-gb`` of free disk (base, fine-tune, merged output; the copy is removed before merge).

Examples:
    python -m benchmarks.bench_throughput                       # 2 x ~6.6 GB, hidden 4096 (15 layers)
    python -m benchmarks.bench_throughput --size-gb 0.5 --hidden 1024 --intermediate 2752 --vocab 8000
    python -m benchmarks.bench_throughput --layers 32 --skip-peft --only extract   # 7B-shaped, ~13.5 GB per side
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_merge import _PEFT, layer_shapes, measure  # noqa: E402
from benchmarks.big_checkpoint import REPO, run_measured  # noqa: E402
from deltakit.io.buffers import large_buffer  # noqa: E402
from deltakit.io.checkpoint import available_memory, open_checkpoint, plan_reads  # noqa: E402
from deltakit.io.writer import SafetensorsWriter  # noqa: E402
from deltakit.math.factorize import DeltaBuffer, truncated_svd  # noqa: E402

CHANGE_RANK = 8
_READ_CHUNK = 1 << 24
_DIRECT_CHUNK = 1 << 26
_IMPORTS = "import deltakit.cli, deltakit.ops.extract, deltakit.ops.merge"


@dataclass
class Step:
    """One measured line of the table."""

    name: str
    seconds: float
    nbytes: int = 0  # bytes the step reads (for the GB/s column); 0: not a throughput
    load: float = 0.0  # 1-minute load average when the step ended
    anon_bytes: int | None = None  # peak RssAnon above the process's start (deltakit processes)
    note: str = ""


def llama_shapes(hidden: int, intermediate: int, vocab: int, layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a llama-shaped model (untied head), in file order."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes |= layer_shapes(i, hidden, intermediate)
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def layers_for(size_bytes: float, hidden: int, intermediate: int, vocab: int) -> int:
    """How many decoder layers make a bf16 checkpoint of about ``size_bytes`` (at least one)."""
    per_layer = sum(math.prod(s) for s in layer_shapes(0, hidden, intermediate).values()) * 2
    return max(1, round((size_bytes - 2 * vocab * hidden * 2) / per_layer))


def build_pair(root: Path, shapes: dict[str, tuple[int, ...]], config: dict, shard_bytes: int,
               seed: int = 0) -> None:
    """Write ``root/base`` and ``root/finetuned`` (bf16, sharded like ``save_pretrained``), one tensor at a time."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    base_dir, ft_dir = root / "base", root / "finetuned"
    for ckpt_dir in (base_dir, ft_dir):
        ckpt_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for k, names in enumerate(shards):
        file_name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        specs = [(name, torch.bfloat16, shapes[name]) for name in names]
        with SafetensorsWriter(base_dir / file_name, specs, {"format": "pt"}) as base_writer, \
                SafetensorsWriter(ft_dir / file_name, specs, {"format": "pt"}) as ft_writer:
            for name in names:
                base, finetuned = _tensor_pair(shapes[name], generator)
                base_writer.write(name, base)
                ft_writer.write(name, finetuned)
                del base, finetuned
        weight_map |= dict.fromkeys(names, file_name)
    index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s in shapes.values())}, "weight_map": weight_map}
    for ckpt_dir in (base_dir, ft_dir):
        (ckpt_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (ckpt_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _tensor_pair(shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if len(shape) == 1:  # a norm: ones, shifted a little by the fine-tune
        base = torch.ones(shape)
        return base.bfloat16(), (base + 0.01 * torch.randn(shape, generator=generator)).bfloat16()
    out, inp = shape
    base = 0.02 * torch.randn(shape, generator=generator)
    finetuned = torch.randn(out, CHANGE_RANK, generator=generator) @ torch.randn(CHANGE_RANK, inp, generator=generator)
    finetuned.mul_(0.002 / CHANGE_RANK**0.5).add_(base)
    base_bf16 = base.bfloat16()
    del base
    noise = torch.randn(shape, generator=generator)
    finetuned.add_(noise, alpha=0.0002)
    del noise
    return base_bf16, finetuned.bfloat16()


def llama_config(hidden: int, intermediate: int, vocab: int, layers: int) -> dict:
    """A config.json transformers (and so PEFT) can build the model from."""
    heads = max(1, hidden // 128)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "dtype": "bfloat16",
    }


def weight_files(*ckpt_dirs: Path) -> list[Path]:
    return [p for d in ckpt_dirs for p in sorted(d.glob("*.safetensors"))]


def drop_page_cache(files: list[Path]) -> str:
    """Flush dirty pages, then drop the page cache: the whole of it where allowed, else these files' pages.
    Returns how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"


def read_floor(files: list[Path], direct: bool = False, stop: threading.Event | None = None) -> float:
    """Seconds to read every byte of ``files`` once, sequentially, into one reused buffer (or until ``stop`` is set).

    ``direct``: with ``O_DIRECT`` (past the page cache), 64 MiB at a time, as deltakit reads inputs that are not
    cached. Otherwise through the page cache, 16 MiB at a time; files larger together than half the available
    memory are dropped from the cache as they are read (without which the kernel reclaims pages on every read), as
    deltakit does where the file system refuses O_DIRECT.
    """
    chunk = _DIRECT_CHUNK if direct else _READ_CHUNK
    buffer = memoryview(large_buffer(chunk))  # as deltakit reads: huge pages, so large requests past the cache
    drop = sum(p.stat().st_size for p in files) > available_memory() / 2 and hasattr(os, "posix_fadvise")
    started = time.perf_counter()
    for path in files:
        with open(os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0)), "rb", buffering=0) as file:
            offset = 0
            while (count := file.readinto(buffer)) and not (stop is not None and stop.is_set()):
                if drop and not direct:
                    os.posix_fadvise(file.fileno(), offset, count, os.POSIX_FADV_DONTNEED)
                offset += count
    return time.perf_counter() - started


@contextmanager
def disk_busy(files: list[Path]) -> Iterator[None]:
    """Inside the block, ``files`` are read past the page cache over and over on a background thread: what extract's
    read-ahead does to the machine while its math runs."""
    stop = threading.Event()

    def read_until_stopped() -> None:
        while not stop.is_set():
            read_floor(files, direct=True, stop=stop)

    reader = threading.Thread(target=read_until_stopped, name="disk-busy", daemon=True)
    reader.start()
    try:
        yield
    finally:
        stop.set()
        reader.join()


def import_floor(repeat: int = 3) -> float:
    """Median wall time of a process that only imports what extract and merge import."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", _IMPORTS], check=True, cwd=REPO)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compute_floor(base_dir: Path, ft_dir: Path, rank: int) -> tuple[float, float, int]:
    """Seconds of ΔW and of the truncated SVD, summed over every 2-D tensor, with the tensors already in memory;
    and the number of modules."""
    base, finetuned = open_checkpoint(base_dir), open_checkpoint(ft_dir)
    plan_reads(base, finetuned)  # the reads are not timed; this only makes them quicker
    buffer = DeltaBuffer(torch.device("cpu"))
    delta_seconds = svd_seconds = 0.0
    modules = 0
    for name, info in base.tensors.items():
        if len(info.shape) != 2:
            continue
        base_w, ft_w = base.get(name), finetuned.get(name)
        started = time.perf_counter()
        delta, energy = buffer.form(ft_w, base_w)
        formed = time.perf_counter()
        truncated_svd(delta, rank, device="cpu", total_energy=energy)
        delta_seconds += formed - started
        svd_seconds += time.perf_counter() - formed
        modules += 1
    return delta_seconds, svd_seconds, modules


def _load() -> float:
    return os.getloadavg()[0]


def _cli_step(name: str, cli_args: list[str], work: Path, inputs: list[Path], nbytes: int,
              checkout: Path = REPO) -> Step:
    how = drop_page_cache(inputs)
    run = run_measured(name.replace(" ", "-"), cli_args, work, checkout)
    return Step(name, run.seconds, nbytes, _load(), run.anon_peak_bytes - run.anon_start_bytes, f"cold ({how})")


class _Steps(list):
    """The steps measured so far, each printed to stderr as it ends, so that a long run shows where it is."""

    def append(self, step: Step) -> None:
        super().append(step)
        print(format_table([step])[-1], file=sys.stderr, flush=True)


def medians(steps: list[Step]) -> list[Step]:
    """One line per step, in the order first run: the median time of its runs (``--repeat``), the highest load
    and memory, each run's time in the note."""
    runs_by_name: dict[str, list[Step]] = {}
    for step in steps:
        runs_by_name.setdefault(step.name, []).append(step)
    combined = []
    for name, runs in runs_by_name.items():
        if len(runs) == 1:
            combined.append(runs[0])
            continue
        memory = [run.anon_bytes for run in runs if run.anon_bytes is not None]
        times = " / ".join(f"{run.seconds:.1f}" for run in runs)
        combined.append(Step(name, statistics.median(run.seconds for run in runs), runs[0].nbytes,
                             max(run.load for run in runs), max(memory) if memory else None,
                             f"median of {len(runs)} rounds: {times} s; {runs[0].note}"))
    return combined


def format_table(steps: list[Step]) -> list[str]:
    lines = ["| step | wall s | GB/s | load avg | peak RssAnon above start | note |", "| --- | --- | --- | --- | --- | --- |"]
    for step in steps:
        rate = f"{step.nbytes / step.seconds / 1e9:.2f}" if step.nbytes else ""
        anon = f"{step.anon_bytes / 2**20:,.0f} MiB" if step.anon_bytes is not None else ""
        lines.append(f"| {step.name} | {step.seconds:.1f} | {rate} | {step.load:.1f} | {anon} | {step.note} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=6.5, help="size of each checkpoint (default 6.5)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: as many as fit --size-gb)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size (default 2)")
    parser.add_argument("--rank", type=int, default=16, help="extract rank (default 16)")
    parser.add_argument("--only", choices=["extract"], help="stop after extract (no copy, merge or PEFT)")
    parser.add_argument("--skip-peft", action="store_true", help="leave out PEFT's merge_and_unload")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of compute floor, extract, copy and merge (medians in the table; default 1)")
    parser.add_argument("--baseline", type=Path, help="also time extract and merge of this checkout's deltakit")
    parser.add_argument("--work", type=Path, help="working directory (default: a new one under the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints and outputs")
    args = parser.parse_args()

    layers = args.layers or layers_for(args.size_gb * 1e9, args.hidden, args.intermediate, args.vocab)
    shapes = llama_shapes(args.hidden, args.intermediate, args.vocab, layers)
    model_bytes = sum(math.prod(s) * 2 for s in shapes.values())
    work = args.work or Path(tempfile.mkdtemp(prefix="deltakit-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    needed = (2 if args.only else 3.1) * model_bytes
    free = shutil.disk_usage(work).free
    if free < needed:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, about {needed / 1e9:.1f} GB needed")
    generated = [work / name for name in ("base", "finetuned", "lora", "merged", "copy", "peft", "lora-baseline",
                                          "merged-baseline")]
    try:
        started = time.perf_counter()
        base_dir, ft_dir = work / "base", work / "finetuned"
        if not (args.keep and base_dir.is_dir() and ft_dir.is_dir()):  # --keep --work: reuse what an earlier run kept
            config = llama_config(args.hidden, args.intermediate, args.vocab, layers)
            build_pair(work, shapes, config, int(args.shard_gb * 1e9))
        files = weight_files(base_dir, ft_dir)
        pair_bytes = sum(p.stat().st_size for p in files)
        print(f"pair of 2 x {model_bytes / 1e9:.2f} GB ({layers} layers, {len(files) // 2} shards each) ready in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)

        steps = _Steps()
        steps.append(Step("import floor (median of 3)", import_floor(), load=_load(), note=_IMPORTS))
        how = drop_page_cache(files)
        steps.append(Step("I/O floor, cold", read_floor(files), pair_bytes, _load(), note=f"both checkpoints; {how}"))
        fits = pair_bytes < 0.8 * available_memory()
        steps.append(Step("I/O floor, warm", read_floor(files), pair_bytes, _load(),
                          note="right after the cold read" + ("" if fits else "; the pair does not fit the page cache")))
        if hasattr(os, "O_DIRECT"):
            how = drop_page_cache(files)
            try:
                steps.append(Step("I/O floor, cold, O_DIRECT", read_floor(files, direct=True), pair_bytes, _load(),
                                  note=f"both checkpoints, past the page cache, 64 MiB reads; {how}"))
            except OSError as e:  # a file system without O_DIRECT (tmpfs): deltakit reads through the cache there
                print(f"no O_DIRECT read floor: {e}", file=sys.stderr)
        lora = work / "lora"
        extract_args = ["extract", str(ft_dir), str(base_dir), "-r", str(args.rank), "-q"]
        base_files = weight_files(base_dir)
        base_bytes = sum(p.stat().st_size for p in base_files)
        merge_args = ["merge", str(base_dir), str(lora), "-q"]
        for round_index in range(args.repeat):  # rounds: a slow spell of the machine hits every step alike
            # This checkout and the baseline swap places every round: on this VM whatever ran right after the copy's
            # 13.5 GB were deleted ran 3–7 s slower (the same two merges, run alone one after the other, took equal
            # times).
            checkouts = [(None, REPO)]
            if args.baseline is not None:
                checkouts.append((args.baseline.name, args.baseline.resolve()))
            if round_index % 2:
                checkouts.reverse()
            delta_s, svd_s, modules = compute_floor(base_dir, ft_dir, args.rank)
            steps.append(Step("compute floor", delta_s + svd_s, load=_load(),
                              note=f"{modules} modules: ΔW {delta_s:.1f} s + SVD r={args.rank} {svd_s:.1f} s"))
            if "I/O floor, cold, O_DIRECT" in {step.name for step in steps}:
                with disk_busy(files):
                    delta_s, svd_s, modules = compute_floor(base_dir, ft_dir, args.rank)
                steps.append(Step("compute floor, disk busy", delta_s + svd_s, load=_load(),
                                  note=f"the same while both checkpoints are read past the cache on another thread: "
                                       f"ΔW {delta_s:.1f} s + SVD {svd_s:.1f} s"))
            for output in (lora, work / "lora-baseline"):  # left by an earlier round or --keep run
                shutil.rmtree(output, ignore_errors=True)
            for baseline, checkout in checkouts:
                if baseline is None:
                    steps.append(_cli_step("deltakit extract", [*extract_args, "-o", str(lora)], work, files,
                                           pair_bytes))
                    in_process = json.loads((lora / "extract_report.json").read_text())["summary"]["seconds"]
                    steps[-1].note += f"; {in_process:.1f} s inside extract()"
                else:
                    steps.append(_cli_step(f"extract ({baseline})", [*extract_args, "-o", str(work / "lora-baseline")],
                                           work, files, pair_bytes, checkout))
            if args.only == "extract":
                continue
            copy = work / "copy"
            how = drop_page_cache(base_files)
            copied = measure("copy", ["sh", "-c", f'cp -r "{base_dir}" "{copy}" && sync'], work, REPO)
            steps.append(Step("cp -r base + sync", copied.seconds, base_bytes, _load(), note=f"cold ({how})"))
            shutil.rmtree(copy)
            for baseline, checkout in checkouts:
                name, merged = ("deltakit merge", work / "merged") if baseline is None else \
                    (f"merge ({baseline})", work / "merged-baseline")
                steps.append(_cli_step(name, [*merge_args, "-o", str(merged)], work, base_files, base_bytes, checkout))
                shutil.rmtree(merged)
        steps = _Steps(medians(steps))
        if args.only != "extract":
            if not args.skip_peft:
                how = drop_page_cache(base_files)
                peft = measure("peft", [sys.executable, "-c", _PEFT, str(base_dir), str(lora), str(work / "peft"),
                                        f"{int(args.shard_gb * 1000)}MB"], work, REPO)
                steps.append(Step("PEFT merge_and_unload + save_pretrained", peft.seconds, base_bytes, _load(),
                                  note=f"cold ({how}); peak RSS {peft.peak_rss / 2**20:,.0f} MiB"))
                shutil.rmtree(work / "peft")

        print(f"\n2 x {model_bytes / 1e9:.2f} GB bf16 (hidden {args.hidden}, intermediate {args.intermediate}, "
              f"vocabulary {args.vocab}, {layers} layers, {len(files) // 2} shards), rank {args.rank}; "
              f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
        print("\n".join(format_table(steps)))
        print()
        print("\n".join(ratios(steps)))
    finally:
        if not args.keep:
            for path in generated:  # never a --work directory itself: it may hold other things
                shutil.rmtree(path, ignore_errors=True)
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)


def ratios(steps: list[Step]) -> list[str]:
    """The targets' ratios, from the table's steps."""
    by_name = {step.name: step for step in steps}
    floor = by_name["import floor (median of 3)"].seconds
    io = min(by_name[name].seconds for name in ("I/O floor, cold", "I/O floor, cold, O_DIRECT") if name in by_name)
    compute = by_name["compute floor"].seconds
    extract = by_name["deltakit extract"].seconds
    lines = [f"extract net of imports / max(I/O floor cold, compute floor) = ({extract:.1f} - {floor:.1f}) / "
             f"{max(io, compute):.1f} = {(extract - floor) / max(io, compute):.2f} (target <= 1.2)"]
    if "compute floor, disk busy" in by_name:
        busy = by_name["compute floor, disk busy"].seconds
        lines.append(f"compute floor with the disk busy / alone = {busy:.1f} / {compute:.1f} = {busy / compute:.2f}; "
                     f"extract net of imports / compute floor with the disk busy = {(extract - floor) / busy:.2f}")
    if "deltakit merge" in by_name:
        merge, copy = by_name["deltakit merge"].seconds, by_name["cp -r base + sync"].seconds
        lines.append(f"merge / durable copy, cold = {merge:.1f} / {copy:.1f} = {merge / copy:.2f}; net of imports "
                     f"{(merge - floor) / copy:.2f} (target <= 1.5)")
    return lines


if __name__ == "__main__":
    main()
