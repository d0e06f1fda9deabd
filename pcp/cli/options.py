"""What every command shares: the resource options, their Context, JSON and console output."""

from __future__ import annotations

import json
import os
from typing import Any, NoReturn

import click

from pcp.cli.config import STACKS, resolve_from
from pcp.cli.context import CloudContext, Context
from pcp.cli.errors import CliError, fail

FLAGS = "pcp.flags"


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None:
        if param.name == "stack" and value not in STACKS:
            raise CliError(f"unknown stack {value!r}: use one of {', '.join(STACKS)}")
        ctx.meta.setdefault(FLAGS, {})[param.name] = value
    return value


def resources(f: Any) -> Any:
    """--stack, --project, --bucket, --region, --outputs: where the stack's resources are.

    They are kept in the click context rather than passed to each command, which reads them
    through `context()`.
    """
    options = [
        ("--stack", "tiny, small, large or huge [env PCP_STACK; default tiny]", None),
        ("--project", "Google Cloud project [env PCP_PROJECT]", None),
        ("--bucket", "the stack bucket [env PCP_BUCKET; default pcp-STACK-PROJECT]", None),
        ("--region", "the scheduler job's region [env PCP_REGION]", None),
        ("--outputs", "`pulumi stack output --json` of the stack [env PCP_OUTPUTS]",
         click.Path(dir_okay=False)),
    ]
    for flag, text, kind in reversed(options):
        f = click.option(flag, help=text, type=kind, callback=_remember,
                         expose_value=False)(f)
    return f


def context() -> Context:
    """The injected Context (tests), or one built from flags, environment and files."""
    click_ctx = click.get_current_context()
    found = click_ctx.find_object(Context)
    if found is not None:
        return found
    config = resolve_from(click_ctx.meta.get(FLAGS, {}), os.environ)
    built = CloudContext(config)
    click_ctx.find_root().obj = built
    return built


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def console() -> Any:
    from pcp.cli.render import make_console

    return make_console()


def unknown_run(ctx: Context, run_id: str) -> NoReturn:
    fail(f"unknown run {run_id!r} on stack {ctx.stack}: not active, queued, recent or "
         f"archived in {ctx.bucket} (see `pcp runs`)")


def run_arg(ctx: Context, text: str) -> str:
    """RUN_ID as a person types it: the id, a unique prefix of one, or `latest`."""
    from pcp.cli.views import resolve_run_id

    try:
        return resolve_run_id(ctx.store, text)
    except LookupError as e:
        fail(f"{e} (see `pcp runs`)")
