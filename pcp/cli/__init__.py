"""The `pcp` command: request runs, follow them, read their state, logs and results.

The CLI never changes state itself. It publishes requests (start, stop, sweep) and reads the
stack bucket, so it works the same against Google Cloud, the local replica and, in tests, the
in-memory twins handed in as a `Context` (`CliRunner().invoke(cli, args, obj=context)`).
Errors a person can fix are one line on stderr, never a traceback.
"""

from __future__ import annotations

import click

from pcp import __version__
from pcp.cli.control import stop, sweep
from pcp.cli.doctor import doctor
from pcp.cli.errors import PcpGroup
from pcp.cli.inspect import logs, queue, results, runs, status, watch
from pcp.cli.local import local
from pcp.cli.shepherd import shepherd
from pcp.cli.submit import run


@click.group(cls=PcpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pcp")
def cli() -> None:
    """Run distributed training on a pcp stack and follow it.

    Resource names come from flags, then PCP_* variables, then a Pulumi outputs file, then
    the local replica (`pcp local up`).
    """


for command in (run, watch, status, runs, queue, logs, results, stop, sweep, doctor, local,
                shepherd):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="pcp")


if __name__ == "__main__":
    main()
