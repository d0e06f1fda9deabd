"""`pcp local up|down`: thin wrappers around the local replica (`pcp_dev.local.daemon`).

The replica is imported only here and only when asked for, so the rest of the CLI never pays
for it and still works where it is not shipped.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from pcp.cli.config import STACKS, ConfigError, local_dir, local_state_file, read_local_state
from pcp.cli.errors import PcpGroup, fail, one_line

#: What installs everything `pcp local up` runs (the `demo` extra of pyproject.toml).
DEMO_INSTALL = ("pip install '.[demo]' in the checkout (or `make demo`, which installs "
                "requirements-demo.txt into .venv)")


@click.group(cls=PcpGroup)
def local() -> None:
    """Start or stop the local replica of the cloud (emulators, functions, fake VMs)."""


def _replica() -> Any:
    try:
        import pcp_dev.local.daemon as replica
    except ModuleNotFoundError as e:
        if e.name in ("pcp_dev", "pcp_dev.local", "pcp_dev.local.daemon"):
            fail("the local replica is not available in this version (pcp_dev.local.daemon "
                 "is missing)")
        fail(f"the local replica needs the Python package that provides {e.name!r}, which is "
             f"not installed: {DEMO_INSTALL}")
    return replica


@local.command("up")
@click.option("--stack", default="tiny", show_default=True, help="the stack to replicate")
@click.option("--no-gcs-limit", is_flag=True,
              help="lift Cloud Storage's one-update-per-second-per-object limit (debugging)")
def local_up(stack: str, no_gcs_limit: bool) -> None:
    """Start the local replica in the background; later commands find it by itself."""
    if stack not in STACKS:
        fail(f"unknown stack {stack!r}: use one of {', '.join(STACKS)}")
    replica = _replica()
    directory = local_dir(os.environ)
    try:
        info = replica.up(stack, directory, keep_bucket=True,
                          **({"no_gcs_limit": True} if no_gcs_limit else {}))
    except (RuntimeError, OSError) as e:  # EmulatorMissing and friends say what to install
        fail(f"the local replica did not start: {one_line(e)}")
    path = local_state_file(directory, stack)
    if not path.exists():  # the replica writes it; keep the CLI's lookup working regardless
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    click.echo(f"local replica of stack {stack} is up: bucket {info.get('bucket')} at "
               f"{info.get('storage_endpoint')}, Pub/Sub at {info.get('pubsub_host')} "
               f"(state in {path})")
    click.echo(f"try: pcp run --stack {stack} --wait")


@local.command("down")
@click.option("--stack", help="only this stack's replica (default: every one)")
@click.option("--wipe", is_flag=True,
              help="also delete the kept bucket (run history), so the next up starts clean")
def local_down(stack: str | None, wipe: bool) -> None:
    """Stop the local replica and everything it started (its bucket is kept)."""
    if stack is not None and stack not in STACKS:
        fail(f"unknown stack {stack!r}: use one of {', '.join(STACKS)}")
    replica = _replica()
    directory = local_dir(os.environ)
    stopped = replica.down(directory, stack)
    if stopped:
        click.echo(f"local replica stopped: {', '.join(stopped)}")
    else:
        click.echo("no local replica was running")
    if wipe:
        wiped = replica.wipe(directory, stack)
        click.echo(f"wiped the kept bucket and node directories of: {', '.join(wiped)}"
                   if wiped else "nothing to wipe")
    elif stopped:
        click.echo("its bucket (run history) is kept for the next `pcp local up`; "
                   "`pcp local down --wipe` deletes it")


def _notice(stack: str, node: str, key: str, value: str) -> None:
    """Post a notice on one local VM's metadata server (the replica's own control path)."""
    import urllib.error
    import urllib.request

    from pcp.core.names import Names

    if stack not in STACKS:
        fail(f"unknown stack {stack!r}: use one of {', '.join(STACKS)}")
    vm = node if node.startswith("pcp-") else Names(stack).vm_of(node)
    if vm is None:
        fail(f"{node!r} is no VM of stack {stack}: name a worker (worker-0) or its VM")
    try:
        state = read_local_state(local_dir(os.environ), stack)
    except ConfigError as e:
        fail(str(e))
    hosts = (state or {}).get("metadata_hosts")
    if not isinstance(hosts, dict):
        fail(f"no local replica of stack {stack} is running (or it predates notices): "
             f"run `pcp local up --stack {stack}`")
    host = hosts.get(vm)
    if not isinstance(host, str):
        fail(f"the local replica of stack {stack} has no VM {vm}: it has "
             f"{', '.join(sorted(hosts)) or 'none'}")
    request = urllib.request.Request(f"http://{host}/pcp-local/notice/{key}",
                                     data=value.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            said = response.read().decode().strip()
    except urllib.error.HTTPError as e:
        fail(f"the metadata server of {vm} refused the notice: {one_line(e.read().decode())}")
    except OSError as e:
        fail(f"the metadata server of {vm} at {host} does not answer ({one_line(e)}): is the "
             f"replica still up? (`pcp local up --stack {stack}`)")
    click.echo(f"{vm}: {said}")


@local.command("maintenance")
@click.argument("node")
@click.option("--stack", default="tiny", show_default=True)
@click.option("--migrate", is_flag=True,
              help="a live migration notice (the VM keeps running) instead of a termination")
def local_maintenance(node: str, stack: str, migrate: bool) -> None:
    """Post a host-maintenance notice on a local VM (instance/maintenance-event); the VM is
    stopped after the replica's notice time, unless the run already moved on."""
    _notice(stack, node, "maintenance-event",
            "MIGRATE_ON_HOST_MAINTENANCE" if migrate else "TERMINATE_ON_HOST_MAINTENANCE")


@local.command("preempt")
@click.argument("node")
@click.option("--stack", default="tiny", show_default=True)
def local_preempt(node: str, stack: str) -> None:
    """Preempt a local VM as Spot preemption does (instance/preempted TRUE, then a stop)."""
    _notice(stack, node, "preempted", "TRUE")
