"""How the `pcp` command fails: one line on stderr and a meaningful exit code.

Failures a person can fix (credentials, names, input, an unknown run, an unreachable endpoint)
become a `CliError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any, NoReturn

import click

from pcp.cli.config import ConfigError
from pcp.cli.context import NO_CREDENTIALS, ReplicaDown
from pcp.core.errors import PermanentError

EXIT_FAILED, EXIT_USAGE, EXIT_WAIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 130


class CliError(click.ClickException):
    """A problem the user can act on: one line on stderr and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares a class default

    def show(self, file: Any = None) -> None:
        click.echo(f"pcp: error: {self.format_message()}", err=True)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    raise CliError(message, code)


def one_line(e: BaseException) -> str:
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    return str(text).strip().splitlines()[0]


def translate(e: Exception) -> CliError | None:
    """Known failures as one-line errors; anything else stays a traceback (a bug)."""
    from google.auth.exceptions import DefaultCredentialsError, RefreshError

    if isinstance(e, DefaultCredentialsError):
        return CliError(NO_CREDENTIALS)
    if isinstance(e, RefreshError):
        return CliError(f"Google Cloud refused the credentials ({one_line(e)}): run "
                        "`gcloud auth application-default login` again")
    if isinstance(e, ConfigError | PermanentError | ReplicaDown):
        return CliError(str(e))
    from google.api_core.exceptions import GoogleAPIError

    if isinstance(e, GoogleAPIError):
        return CliError(f"Google Cloud: {one_line(e)}")
    if isinstance(e, ConnectionError) or type(e).__module__.startswith(("requests", "urllib3")):
        return CliError(f"cannot reach the stack's storage or Pub/Sub: {one_line(e)}")
    if isinstance(e, OSError):  # e.g. --dest not writable
        return CliError(one_line(e))
    return None


class PcpGroup(click.Group):
    """A command group whose subcommands fail in one line (see `translate`)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            error = translate(e)
            if error is None:
                raise
            raise error from e
