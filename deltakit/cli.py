"""The ``deltakit`` command: parse options, call one library function, print the summary.

``main`` is the single error boundary: a :class:`DeltakitError` becomes one line on stderr and its exit code;
anything else is a bug and keeps its traceback. ``--debug`` (or ``DELTAKIT_DEBUG=1``) shows tracebacks always.

Only click and the error classes are imported at module level: each command imports torch and its operation
inside its body, so ``--help`` and option errors answer at once, and a Ctrl-C while torch loads is inside
``main``'s boundary. A new command or flag keeps that shape: import what it runs inside the command.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from deltakit.defaults import (
    CALIB_SEQ_LEN,
    CALIB_TOKENS,
    DEFAULT_INSPECT_RANKS,
    DEFAULT_MAX_RANK,
    DEFAULT_RANK,
    DEFAULT_WEIGHTING,
    FACTOR_DTYPES,
    STORED_DTYPES,
    WEIGHTINGS,
)
from deltakit.errors import DeltakitError


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        click.echo(line, err=True)


def _echo_summary(lines: list[str], out: str | os.PathLike) -> None:
    """The report's summary, then where the output went, as the last line (absolute: no guessing the cwd)."""
    _echo_lines([*lines, f"output: {os.path.abspath(out)}"])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="deltakit")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Extract LoRA/DoRA adapters from fine-tuned checkpoints, and merge them back."""
    ctx.obj = {"debug": debug}


class _RankType(click.ParamType):
    """``-r``: a positive integer or ``auto``."""

    name = "INTEGER|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from deltakit.math.ranks import parse_rank

        try:
            return parse_rank(str(value))
        except DeltakitError as e:
            self.fail(str(e), param, ctx)


def default_out(finetuned: str, suffix: str) -> str:
    """FINETUNED's name plus a suffix, in the working directory: one rule for a local path and a Hub id."""
    if os.path.exists(finetuned):
        name = Path(os.path.abspath(finetuned)).name
        if name.endswith((".safetensors", ".bin")):
            name = name.rsplit(".", 1)[0]
    else:  # a Hub id org/name[@revision]
        name = finetuned.partition("@")[0].rstrip("/").rsplit("/", 1)[-1]
    return f"{name}{suffix}"


def _executor_options(what: str):
    """``--executor`` and ``--address``, as batch and extract share them."""

    def decorate(command):
        command = click.option("--address", help="With --executor ray: the cluster, `auto` (started by `ray start` "
                               "on this machine) or ray://HOST:PORT. [default: start Ray here for the run]")(command)
        return click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                            help=f"Run {what} here, or as tasks on a Ray cluster (pip install "
                            "'deltakit[ray]').")(command)

    return decorate


def _calib_size_options(command):
    """``--calib-tokens`` and ``--calib-seq-len``, as extract and inspect share them."""
    command = click.option("--calib-seq-len", type=click.IntRange(min=2), default=CALIB_SEQ_LEN, show_default=True,
                           help="Length of each calibration sequence.")(command)
    return click.option("--calib-tokens", type=click.IntRange(min=2), default=CALIB_TOKENS, show_default=True,
                        help="Calibration tokens.")(command)


def _check_address(executor: str, address: str | None) -> None:
    if address is not None and executor != "ray":
        raise click.UsageError("--address needs --executor ray")


_SVD_CHOICE = click.Choice(["auto", "exact", "randomized"])
_DEVICE_HELP = "auto (CUDA if available), cpu, cuda or cuda:N."


@cli.command("extract")
@click.argument("finetuned")
@click.argument("base")
@click.option("-r", "--rank", type=_RankType(), default=DEFAULT_RANK, show_default=True,
              help="Rank of every module, or 'auto': per module, the singular values above the noise floor.")
@click.option("-o", "--out", help="Adapter directory to write. [default: FINETUNED name + -lora-r<rank>]")
@click.option("--alpha", type=float, help="lora_alpha. [default: each module's rank, i.e. scaling 1]")
@click.option("--rslora", "use_rslora", is_flag=True, help="rsLoRA scaling alpha/sqrt(r).")
@click.option("--svd", type=_SVD_CHOICE, default="auto", show_default=True,
              help="Truncated SVD route; auto picks exact for small matrices, randomized for large ones.")
@click.option("--oversample", type=click.IntRange(min=0), help="Randomized SVD oversampling.")
@click.option("--niter", type=click.IntRange(min=0), help="Randomized SVD power iterations.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
@click.option("--dtype", type=click.Choice(sorted(STORED_DTYPES)), help="Dtype of the stored factors. [default: the base's]")
@click.option("--factor-dtype", type=click.Choice(FACTOR_DTYPES),
              help="How the factors are stored: int8 or float8_e4m3fn (8 bits, one scale per factor folded into "
              "alpha_pattern), or a float dtype (as --dtype).")
@click.option("--include", multiple=True, help="Regex on module names to include (repeatable).")
@click.option("--exclude", multiple=True, help="Regex on module names to exclude (repeatable).")
@click.option("--rank-pattern", "rank_patterns", multiple=True, metavar="REGEX=R",
              help="Rank for modules matching REGEX, PEFT's rank_pattern rule; first match wins (repeatable).")
@click.option("--energy", type=click.FloatRange(min=0, max=1, min_open=True),
              help="Per module, the smallest rank keeping this fraction of ||ΔW||².")
@click.option("--budget", help="Total size of the factors, spent where it lowers the error most: bytes (50MB, "
              "1.5GiB), a share of the model (2%), or parameters (3Mparams, 1200000).")
@click.option("--avg-rank", type=click.FloatRange(min=0, min_open=True),
              help="A budget equal to a uniform adapter of this rank, allocated per module.")
@click.option("--min-rank", type=click.IntRange(min=1), help="Floor of every module's rank under a budget. [default: 1]")
@click.option("--max-rank", type=click.IntRange(min=1),
              help=f"Cap of every module's rank with --energy, --budget, --avg-rank or --rank auto. [default: "
              f"{DEFAULT_MAX_RANK}]")
@click.option("--budget-weighting", type=click.Choice(list(WEIGHTINGS)), default=DEFAULT_WEIGHTING,
              show_default=True, help="uniform: the largest uniform rank that fits; absolute: minimise the total "
              "squared error of ΔW; relative: the sum of each module's squared relative error.")
@click.option("--dora", is_flag=True, help="Extract a DoRA adapter (per-row magnitude + low-rank direction).")
@click.option("--calib", metavar="SOURCE", help="Fit each module to its outputs on calibration text: a text file, "
              "a .jsonl file (\"text\" fields), or 'self' (sampled from FINETUNED). Needs deltakit[calib].")
@_calib_size_options
@click.option("--carry/--no-carry", default=True, show_default=True,
              help="Store changed biases, norms and heads exactly in the adapter, or drop them (reported).")
@click.option("--for", "target", type=click.Choice(["peft", "vllm"]), default="peft", show_default=True,
              help="Who loads the adapter. vllm: only what vLLM's loader accepts (norm changes folded into the "
              "Linear layers reading them, one scaling for all modules, no modules_to_save/biases/DoRA).")
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@_executor_options("the modules' fits one after another")
def extract_command(finetuned: str, base: str, out: str | None, rank_patterns: tuple[str, ...],
                    include: tuple[str, ...], exclude: tuple[str, ...], quiet: bool, executor: str,
                    address: str | None, **options) -> None:
    """Extract a LoRA adapter from FINETUNED (a fully fine-tuned checkpoint) and its BASE.

    Either may be a local directory, a .safetensors file, or a Hub id org/name[@revision].

    \b
    Example:
      deltakit extract ./llama-ft ./llama-base -r 16 -o ./llama-ft-lora-r16
      deltakit extract ft/ base/ --energy 0.9 --max-rank 128
      deltakit extract ft/ base/ --budget 50MB
      deltakit extract ft/ base/ -r 16 --calib self
      deltakit extract ft/ base/ -r 64 --for vllm -o ft-vllm-r64
      deltakit extract /shared/ft /shared/base -r 16 --executor ray --address auto
    """
    from deltakit.math.ranks import parse_rank_pattern, rank_policy
    from deltakit.ops.extract import extract

    _check_address(executor, address)
    ctx = click.get_current_context()
    allocated = [name for name in ("energy", "budget", "avg_rank") if options[name] is not None]
    if allocated and ctx.get_parameter_source("rank") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError(f"--rank and --{allocated[0].replace('_', '-')} each choose the ranks; give only one")
    patterns = [parse_rank_pattern(p) for p in rank_patterns]
    policy = rank_policy(options["rank"], energy=options["energy"], budget=options["budget"],
                         avg_rank=options["avg_rank"], min_rank=options["min_rank"], max_rank=options["max_rank"],
                         budget_weighting=options["budget_weighting"], rank_pattern=patterns)
    out = out or default_out(finetuned, f"-{'dora' if options['dora'] else 'lora'}-r{policy.label}")
    runner = None
    if executor == "ray":
        from deltakit.ops.ray_cluster import RayMap  # imports ray, which only this executor needs

        runner = RayMap(address)
    report = extract(
        finetuned, base, out,
        rank_pattern=patterns,
        include=list(include) or None, exclude=list(exclude) or None,
        progress=not quiet,
        executor=runner,
        **options,
    )
    if not quiet:
        _echo_summary(report.summary_lines(), out)


def _merge_options(command):
    """The options merge and unmerge share."""
    for decorator in reversed([
        click.option("-o", "--out", required=True, help="Checkpoint directory to write."),
        click.option("-w", "--weight", "weights", type=float, multiple=True,
                     help="Weight of each adapter, in order (repeat once per adapter). [default: 1.0 each]"),
        click.option("--dtype", type=click.Choice(sorted(STORED_DTYPES)),
                     help="Dtype of every floating-point tensor written. [default: each base tensor's]"),
        click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP),
        click.option("--dry-run", is_flag=True, help="Check everything and print which tensors change; write nothing."),
        click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary."),
    ]):
        command = decorator(command)
    return command


@cli.command("merge")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@_merge_options
def merge_command(base: str, adapters: tuple[str, ...], weights: tuple[float, ...], quiet: bool, **options) -> None:
    """Merge one or more PEFT LoRA/DoRA ADAPTERS into BASE, streamed shard by shard.

    LoRA adapters add up (order-free); DoRA adapters apply in the order given, as PEFT's merge_and_unload does.
    The output mirrors BASE's shards, index and metadata, and keeps a receipt that lets unmerge restore BASE.

    \b
    Example:
      deltakit merge ./llama-base ./ft-lora-r16 -o ./llama-merged
      deltakit merge ./llama-base ./a ./b -w 1.0 -w 0.5 -o ./llama-ab
    """
    from deltakit.ops.merge import merge

    report = merge(base, list(adapters), weights=list(weights) or None, progress=not quiet, **options)
    if options["dry_run"]:
        _echo_lines(report.summary_lines())
    elif not quiet:
        _echo_summary(report.summary_lines(), options["out"])


@cli.command("unmerge")
@click.argument("merged")
@click.argument("adapters", nargs=-1, required=True)
@_merge_options
def unmerge_command(merged: str, adapters: tuple[str, ...], weights: tuple[float, ...], quiet: bool,
                    **options) -> None:
    """Take ADAPTERS back out of MERGED, a checkpoint that `deltakit merge` wrote.

    With merge's receipt, DoRA and replaced tensors are restored exactly; without it, only LoRA adapters that
    replace no tensor can be taken out.

    \b
    Example:
      deltakit unmerge ./llama-merged ./ft-lora-r16 -o ./llama-base-again
    """
    from deltakit.ops.merge import unmerge

    report = unmerge(merged, list(adapters), weights=list(weights) or None, progress=not quiet, **options)
    if options["dry_run"]:
        _echo_lines(report.summary_lines())
    elif not quiet:
        _echo_summary(report.summary_lines(), options["out"])


@cli.command("stack")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--out", required=True, help="Adapter directory to write.")
@click.option("-w", "--weight", "weights", type=float, multiple=True,
              help="Weight of each adapter, in order (repeat once per adapter). [default: 1.0 each]")
@click.option("--exact", is_flag=True, help="Concatenate the factors: ranks add, nothing is lost.")
@click.option("-r", "--rank", type=click.IntRange(min=1), help="Re-truncate every module to this rank (optimal).")
@click.option("--energy", type=click.FloatRange(min=0, max=1, min_open=True),
              help="Re-truncate each module to the smallest rank keeping this fraction of its ||ΔW||².")
@click.option("--base", help="The adapters' base: lets weights scale carried tensors, as BASE + w·(T − BASE).")
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
def stack_command(adapters: tuple[str, ...], weights: tuple[float, ...], quiet: bool, **options) -> None:
    """Combine LoRA ADAPTERS into one PEFT adapter whose ΔW is the weighted sum of theirs.

    One of --exact, --rank or --energy. Truncation works from the factors alone, never forming a dense ΔW.

    \b
    Example:
      deltakit stack ./math-lora ./code-lora --exact -o ./math-code
      deltakit stack ./a ./b -w 1.0 -w 0.5 --rank 32 -o ./ab-r32
    """
    from deltakit.ops.stack import stack

    report = stack(list(adapters), weights=list(weights) or None, **options)
    if not quiet:
        _echo_summary(report.summary_lines(), options["out"])


@cli.command("inspect")
@click.argument("finetuned")
@click.argument("base")
@click.option("-o", "--out", help="Directory for report.json and PNG plots (plots need the 'plot' extra).")
@click.option("--ranks", default=",".join(map(str, DEFAULT_INSPECT_RANKS)), show_default=True,
              help="Ranks at which energy retained is reported, comma-separated.")
@click.option("--max-rank", type=click.IntRange(min=1), default=DEFAULT_MAX_RANK, show_default=True,
              help="Leading singular values computed per module.")
@click.option("--svd", type=_SVD_CHOICE, default="auto", show_default=True, help="Truncated SVD route.")
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
@click.option("--include", multiple=True, help="Regex on module names to include (repeatable).")
@click.option("--exclude", multiple=True, help="Regex on module names to exclude (repeatable).")
@click.option("--calib", metavar="SOURCE", help="Also show each module's whitened spectrum on calibration text "
              "(as extract --calib): a text file, a .jsonl file, or 'self'.")
@_calib_size_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of the table.")
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def inspect_command(finetuned: str, base: str, ranks: str, include: tuple[str, ...], exclude: tuple[str, ...],
                    as_json: bool, quiet: bool, **options) -> None:
    """Show how each weight of FINETUNED changed from BASE and which rank would keep how much.

    Per module: ||ΔW||, ||ΔW||/||W0||, leading singular values, energy retained at each rank, suggested ranks
    (energy 90%, noise floor), and the size/error frontier of uniform rank against budget allocation.

    \b
    Example:
      deltakit inspect ./llama-ft ./llama-base -o ./llama-ft-inspect
      deltakit inspect ft/ base/ --ranks 4,16,64 --json > report.json
    """
    from deltakit.math.ranks import parse_ranks
    from deltakit.ops.inspect import inspect

    report = inspect(finetuned, base, ranks=parse_ranks(ranks), include=list(include) or None,
                     exclude=list(exclude) or None, progress=not quiet, **options)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif options["out"]:
        _echo_summary(report.table_lines(), options["out"])
    else:
        _echo_lines(report.table_lines())


@cli.command("batch")
@click.argument("manifest")
@click.option("--continue-on-error", is_flag=True, help="After a job fails, run the jobs that do not depend on it.")
@click.option("--dry-run", is_flag=True, help="Validate every job (paths, Hub ids, options); run nothing.")
@click.option("--push", is_flag=True, help="Upload every job's output to its push_repo on the Hub.")
@click.option("--summary", help="JSON summary file. [default: <manifest stem>.summary.json beside the manifest]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary table.")
@_executor_options("the jobs one at a time")
def batch_command(manifest: str, quiet: bool, executor: str, address: str | None, **options) -> None:
    """Run the extract/merge/unmerge jobs a MANIFEST (.toml or .json) lists, skipping those already done.

    A rerun after an interruption redoes only unfinished jobs; the exit code is non-zero if any job failed.

    \b
    Example:
      deltakit batch jobs.toml
      deltakit batch jobs.toml --continue-on-error --push
      deltakit batch jobs.toml --executor ray --address auto
    """
    from deltakit.ops.batch import run_batch

    _check_address(executor, address)
    runner = None
    if executor == "ray":
        from deltakit.ops.batch_ray import RayExecutor  # imports ray, which only this executor needs

        runner = RayExecutor(address)
    report = run_batch(manifest, progress=not quiet, executor=runner, **options)
    if not quiet or report.error is not None:
        _echo_lines(report.summary_lines())
    if report.error is not None:
        raise report.error


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; the one place where deltakit's errors become exit codes."""
    args = sys.argv[1:] if argv is None else argv
    # OpenMP threads that find no work spin for ~0.3 ms before sleeping (libgomp's default). deltakit's math
    # runs many short parallel regions beside a read-ahead thread, so on a box with anything else running the
    # spinning threads take the cores the others need: extract -r 16 on a 2.1 GB pair took 157 s with the
    # default and 24 s without spinning at load ~6 on 2 cores (benchmarks/README.md). Read by OpenMP when torch
    # loads, hence here, before any command imports it; a value the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    debug = "--debug" in args or os.environ.get("DELTAKIT_DEBUG") == "1"
    try:
        cli.main(args=args, prog_name="deltakit", standalone_mode=False)
    except click.exceptions.Abort as e:
        click.echo("Aborted!", err=True)
        # click turns Ctrl-C into Abort; the shell's convention for SIGINT is 128 + 2.
        sys.exit(130 if isinstance(e.__context__, KeyboardInterrupt) else 1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except DeltakitError as e:
        if debug:
            raise
        click.echo(f"deltakit: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("Aborted!", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
