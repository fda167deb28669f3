"""What every `faasmoe` command shares: how a user's error ends it, and which options were given.

Light on purpose (typer and faasmoe.errors only): `faasmoe --help` imports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperGroup

from faasmoe.errors import FaasmoeError

EXIT_USER_ERROR = 2  # as for click's usage errors


class BadOption(FaasmoeError):
    """The command line asks for something the command cannot do."""


class FaasmoeGroup(TyperGroup):
    """Ends a command that raised a user's error with ``error: <message>`` in red on stderr and exit code 2.

    A user's error is a FaasmoeError or settings that fail validation ("bad settings:" and pydantic's
    account of each field); anything else is a bug and keeps its traceback.
    """

    def invoke(self, ctx: typer.Context) -> Any:
        from pydantic import ValidationError

        try:
            return super().invoke(ctx)
        except ValidationError as exc:
            _fail(f"bad settings:\n{exc}")
        except FaasmoeError as exc:
            _fail(str(exc))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=EXIT_USER_ERROR)


@contextmanager
def user_input() -> Iterator[None]:
    """A ValueError raised inside is about what the user gave (a preset, a dtype, USER:PASSWORD): a BadOption."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError:
        raise
    except ValueError as exc:
        raise BadOption(str(exc)) from exc


def given(**options: Any) -> dict[str, Any]:
    """The options the user gave: a None option was not given, so it keeps its environment variable or default."""
    return {name: value for name, value in options.items() if value is not None}
