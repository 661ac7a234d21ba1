"""The ``deltakit`` command: parse options, call one library function, print the summary.

``main`` is the single error boundary: a :class:`DeltakitError` becomes one line on stderr and its exit code;
anything else is a bug and keeps its traceback. ``--debug`` (or ``DELTAKIT_DEBUG=1``) shows tracebacks always.
"""

from __future__ import annotations

import os
import sys

import click

from .errors import DeltakitError
from .extract import DTYPES, extract
from .ranks import parse_rank_pattern


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        click.echo(line, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="deltakit")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Extract LoRA/DoRA adapters from fine-tuned checkpoints, and merge them back."""
    ctx.obj = {"debug": debug}


@cli.command("extract")
@click.argument("finetuned")
@click.argument("base")
@click.option("-r", "--rank", type=click.IntRange(min=1), default=16, show_default=True,
              help="Rank of every module (unless --energy or --rank-pattern).")
@click.option("-o", "--out", help="Adapter directory to write. [default: FINETUNED name + -lora-r<rank>]")
@click.option("--alpha", type=float, help="lora_alpha. [default: each module's rank, i.e. scaling 1]")
@click.option("--rslora", "use_rslora", is_flag=True, help="rsLoRA scaling alpha/sqrt(r).")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="Truncated SVD route; auto picks exact for small matrices, randomized for large ones.")
@click.option("--oversample", type=click.IntRange(min=0), help="Randomized SVD oversampling.")
@click.option("--niter", type=click.IntRange(min=0), help="Randomized SVD power iterations.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), help="Dtype of the stored factors. [default: the base's]")
@click.option("--include", multiple=True, help="Regex on module names to include (repeatable).")
@click.option("--exclude", multiple=True, help="Regex on module names to exclude (repeatable).")
@click.option("--rank-pattern", "rank_patterns", multiple=True, metavar="REGEX=R",
              help="Rank for modules matching REGEX, PEFT's rank_pattern rule; first match wins (repeatable).")
@click.option("--energy", type=click.FloatRange(min=0, max=1, min_open=True),
              help="Per module, the smallest rank keeping this fraction of ||ΔW||².")
@click.option("--max-rank", type=click.IntRange(min=1), help="Cap for --energy. [default: 256]")
@click.option("--dora", is_flag=True, help="Extract a DoRA adapter (per-row magnitude + low-rank direction).")
@click.option("--carry/--no-carry", default=True, show_default=True,
              help="Store changed biases, norms and heads exactly in the adapter, or drop them (reported).")
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def extract_command(finetuned: str, base: str, out: str | None, rank_patterns: tuple[str, ...],
                    include: tuple[str, ...], exclude: tuple[str, ...], quiet: bool, **options) -> None:
    """Extract a LoRA adapter from FINETUNED (a fully fine-tuned checkpoint) and its BASE.

    \b
    Example:
      deltakit extract ./llama-ft ./llama-base -r 16 -o ./llama-ft-lora-r16
      deltakit extract ft/ base/ --energy 0.9 --max-rank 128
    """
    report = extract(
        finetuned, base,
        out or f"{finetuned.rstrip('/')}-lora-r{options['rank']}",
        rank_pattern=[parse_rank_pattern(p) for p in rank_patterns],
        include=list(include) or None, exclude=list(exclude) or None,
        progress=not quiet,
        **options,
    )
    if not quiet:
        _echo_lines(report.summary_lines())


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; the one place where deltakit's errors become exit codes."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("DELTAKIT_DEBUG") == "1"
    try:
        cli.main(args=args, prog_name="deltakit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
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
