"""The `pcp` command: request runs, follow them, read their state, logs and results.

The CLI never changes state itself. It publishes requests (start, stop, sweep) and reads the
stack bucket, so it works the same against Google Cloud, the local replica and, in tests, the
in-memory twins handed in as a `Context` (`CliRunner().invoke(cli, args, obj=context)`).
Errors a person can fix are one line on stderr, never a traceback.
"""

from __future__ import annotations

# ruff: noqa: E402 - the imports below need what require() checks
from pcp.cli.needs import require

require()  # a bare `pip install .` has no click: say what to install, in one line

import click

from pcp import __version__
from pcp.cli.budget import budget
from pcp.cli.control import stop, sweep
from pcp.cli.cost import cost
from pcp.cli.doctor import doctor
from pcp.cli.errors import PcpGroup
from pcp.cli.events import events
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


#: One line each in `pcp --help`, whole at 80 columns (click would cut the docstrings).
SHORT_HELP = {
    run: "Request a training run; with --wait, follow it live to its end.",
    watch: "Follow a run live until it ends (again after Ctrl-C).",
    status: "A run's status and failure cause, or the whole stack.",
    runs: "Recent runs: status, duration, cost and training config.",
    queue: "The active run and the runs waiting behind it.",
    logs: "Print (or follow) a run's stdout and stderr, per node.",
    results: "Download a run's files and print its summary.",
    events: "What the control plane did and healed (sweeps, runs, power-offs).",
    stop: "Stop a run, take it off the queue or end its lease.",
    sweep: "Run the stack's sweeper now (the safety net).",
    doctor: "Check credentials, bucket, topics, scheduler and quotas.",
    cost: "The stack's standing cost while idle, and its runs' cost by day.",
    local: "Start or stop the local replica of the cloud.",
    shepherd: "Install the shepherd daemon on the head-node Mac.",
    budget: "Show or lift the stack's budget hold (the kill switch).",
}

for command, text in SHORT_HELP.items():
    command.short_help = text
    cli.add_command(command)


def main() -> None:
    cli(prog_name="pcp")


if __name__ == "__main__":
    main()
