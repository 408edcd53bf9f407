"""The ``sslmask`` command line. Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys

import click

from sslmask.data import ShardError, dumps, resolve_shards, summarize


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maskgen-sslmask")
def cli() -> None:
    """Mask-aware self-supervised training from maskgen shards."""


@cli.command()
@click.argument("shards", nargs=-1, required=True)
def inspect(shards: tuple[str, ...]) -> None:
    """Check that SHARDS can be trained on and print what they hold (JSON).

    SHARDS are maskgen build folders, shard files, globs or brace patterns.
    """
    click.echo(dumps(summarize(resolve_shards(shards))))


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="sslmask", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        click.echo(f"{ctx.command_path if ctx else 'sslmask'}: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except ShardError as exc:
        click.echo(f"sslmask: error: {exc}", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
