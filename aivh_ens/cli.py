"""Thin click commands: each parses options and hands off to one library module.

Exit codes: 0 success, 2 bad input (a one-line ``error: ...`` on stderr, no traceback), 1 a bug.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before anything imports huggingface_hub or albumentations: no network calls at import time unless the
# user opted in (the machines this runs on are often offline, where each attempt costs ~47 s).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import click

from aivh_ens.errors import UserError

WORKDIR = click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Project folder holding folds/, oof/, runs/.",
)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="aivh-ens")
def main() -> None:
    """aivh-ens: cross-validated timm ensembles for "AI-generated or human-made?" competitions.

    \b
    aivh-ens cv --model efficientnet_b4 --folds 5 --data data/
    aivh-ens cv --model convnext_tiny --folds 5 --data data/
    aivh-ens blend
    aivh-ens submit --data data/
    """


# ---- blend ---------------------------------------------------------------------------------------------
# (the blend command is defined below this line)


# ---- demo-data -----------------------------------------------------------------------------------------
# (the demo-data command is defined below this line)


if __name__ == "__main__":
    main()
