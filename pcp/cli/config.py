"""Where the `pcp` command finds a stack's resource names.

Order, per name: command-line flags, then the environment (`PCP_*`), then a Pulumi outputs
file (`pulumi stack output --json`), then the local replica's state file
(`.pcp-local/<stack>.json`, written by `pcp local up`). The decision is one pure function,
`resolve`, so the order is tested without files, clouds or environment; the two small readers
below it do the I/O.

The local replica's file is used only when nothing above it names a project or a bucket:
mixing a real project with a local emulator's endpoints would be worse than an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcp.core.names import Names
from pcp.core.policy import STACK_SIZES

STACKS = tuple(STACK_SIZES)
DEFAULT_STACK = "tiny"
LOCAL_DIR_ENV = "PCP_LOCAL_DIR"
DEFAULT_LOCAL_DIR = ".pcp-local"
NAMES = ("project", "bucket", "region")
ENV_OF = {"stack": "PCP_STACK", "project": "PCP_PROJECT", "bucket": "PCP_BUCKET",
          "region": "PCP_REGION"}
# The local replica's file may spell its endpoints either way.
STORAGE_KEYS = ("storage_endpoint", "storage_emulator_host")
PUBSUB_KEYS = ("pubsub_host", "pubsub_emulator_host")


class ConfigError(Exception):
    """The names cannot be resolved; the message says what to pass or set."""


@dataclass(frozen=True)
class Config:
    """A stack's resolved resource names, and where each came from."""

    stack: str
    project: str
    bucket: str
    region: str | None = None
    scheduler_job: str | None = None
    storage_endpoint: str | None = None
    pubsub_host: str | None = None
    local: bool = False
    sources: Mapping[str, str] = field(default_factory=dict)
    #: Where the stack's VMs live and the stack's price table (`pcp cost`, docs/cli.md):
    #: PCP_ZONE or the outputs' `zone`; PCP_PRICES (JSON) or the outputs' `prices`.
    zone: str | None = None
    compute_endpoint: str | None = None  # the local replica's Compute endpoint
    prices: Any = None
    #: The local replica's supervisor, from its state file: pid, when that process started
    #: (so a reused pid is not mistaken for it) and its latest heartbeat (ISO time).
    supervisor: Mapping[str, Any] = field(default_factory=dict)

    def topic(self, kind: str) -> str:
        return Names(self.stack).topic(kind)

    def topic_path(self, kind: str) -> str:
        return f"projects/{self.project}/topics/{self.topic(kind)}"

    @property
    def job_name(self) -> str | None:
        """The sweep job's full name, `projects/P/locations/R/jobs/pcp-S-sweep`."""
        job = self.scheduler_job or Names(self.stack).scheduler_job
        if job.startswith("projects/"):
            return job
        if not self.region:
            return None
        return f"projects/{self.project}/locations/{self.region}/jobs/{job}"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _stack_name(value: Any) -> str | None:
    """Pulumi may print a qualified `org/project/stack`; the stack is the last part."""
    text = _text(value)
    return None if text is None else text.rsplit("/", 1)[-1]


def _region_of_zone(zone: Any) -> str | None:
    text = _text(zone)
    if text is None or text.count("-") < 2:
        return None
    return text.rsplit("-", 1)[0]


def resolve(flags: Mapping[str, str | None], env: Mapping[str, str],
            outputs: Mapping[str, Any] | None = None,
            local_state: Callable[[str], Mapping[str, Any] | None] = lambda stack: None,
            ) -> Config:
    """Resolve names: flags > environment > outputs file > local replica state file."""
    outputs = outputs or {}
    sources: dict[str, str] = {}

    stack = None
    for source, value in (("--stack", flags.get("stack")), ("PCP_STACK", env.get("PCP_STACK")),
                          ("outputs", _stack_name(outputs.get("stack")))):
        if _text(value):
            stack, sources["stack"] = _text(value), source
            break
    if stack is None:
        stack, sources["stack"] = DEFAULT_STACK, "default"
    if stack not in STACKS:
        raise ConfigError(f"unknown stack {stack!r}: use one of {', '.join(STACKS)}")
    out_stack = _stack_name(outputs.get("stack"))
    if out_stack and out_stack != stack:
        raise ConfigError(f"the outputs file is for stack {out_stack!r}, not {stack!r}")

    names: dict[str, str | None] = {}
    for key in NAMES:
        names[key] = None
        for source, value in ((f"--{key}", flags.get(key)), (ENV_OF[key], env.get(ENV_OF[key])),
                              ("outputs", outputs.get(key))):
            if _text(value):
                names[key], sources[key] = _text(value), source
                break
    if names["region"] is None and _region_of_zone(outputs.get("zone")):
        names["region"], sources["region"] = _region_of_zone(outputs.get("zone")), "outputs"
    job = _text(outputs.get("scheduler_job"))
    zone = _text(env.get("PCP_ZONE")) or _text(outputs.get("zone"))
    prices = _text(env.get("PCP_PRICES")) or outputs.get("prices")
    compute_endpoint = None

    storage_endpoint = pubsub_host = None
    local = False
    supervisor: dict[str, Any] = {}
    if names["project"] is None and names["bucket"] is None:
        state = local_state(stack)
        if state:
            local = True
            names["project"], names["bucket"] = _text(state.get("project")), _text(
                state.get("bucket"))
            storage_endpoint = next((_text(state[k]) for k in STORAGE_KEYS if state.get(k)), None)
            pubsub_host = next((_text(state[k]) for k in PUBSUB_KEYS if state.get(k)), None)
            missing = [k for k, v in (("project", names["project"]), ("bucket", names["bucket"]),
                                      (STORAGE_KEYS[0], storage_endpoint),
                                      (PUBSUB_KEYS[0], pubsub_host)) if not v]
            if missing:
                raise ConfigError(f"the local replica's state file for stack {stack} lacks "
                                  f"{', '.join(missing)}: run `pcp local up --stack {stack}` again")
            sources.update(project="local replica", bucket="local replica")
            supervisor = {k: state[k] for k in ("pid", "pid_start", "heartbeat_at")
                          if state.get(k) is not None}
            if names["region"] is None and _text(state.get("region")):
                names["region"], sources["region"] = _text(state.get("region")), "local replica"
            zone = zone or _text(state.get("zone"))
            compute_endpoint = _text(state.get("compute_endpoint"))

    project = names["project"]
    if project is None:
        raise ConfigError(
            f"no resource names for stack {stack}: pass --project (and --bucket), set "
            f"PCP_PROJECT, pass --outputs FILE (from `pulumi stack output --json`), or start "
            f"the local replica with `pcp local up --stack {stack}`")
    bucket = names["bucket"]
    if bucket is None:
        bucket, sources["bucket"] = Names(stack, project).bucket, "default"
    return Config(stack=stack, project=project, bucket=bucket, region=names["region"],
                  scheduler_job=job, storage_endpoint=storage_endpoint, pubsub_host=pubsub_host,
                  local=local, sources=dict(sources), zone=zone,
                  compute_endpoint=compute_endpoint, prices=prices, supervisor=supervisor)


# ---------------------------------------------------------------- the readers


def load_outputs(path: str | Path) -> dict[str, Any]:
    """The JSON object `pulumi stack output --json` prints."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read the outputs file {path}: {e.strerror or e}") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"the outputs file {path} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"the outputs file {path} must hold a JSON object")
    return obj


def local_dir(env: Mapping[str, str], cwd: Path | None = None) -> Path:
    """$PCP_LOCAL_DIR, else the `.pcp-local` of the checkout we are in, from any of its
    directories: the nearest one up the tree, else the one beside the checkout's `.git`, else
    `.pcp-local` here."""
    if env.get(LOCAL_DIR_ENV):
        return Path(env[LOCAL_DIR_ENV])
    here = (cwd or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / DEFAULT_LOCAL_DIR).is_dir():
            return directory / DEFAULT_LOCAL_DIR
        if (directory / ".git").exists():
            return directory / DEFAULT_LOCAL_DIR
    return Path(DEFAULT_LOCAL_DIR)


def local_state_file(directory: Path, stack: str) -> Path:
    return directory / f"{stack}.json"


def read_local_state(directory: Path, stack: str) -> dict[str, Any] | None:
    """The local replica's state file for `stack`, or None when there is none."""
    path = local_state_file(directory, stack)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        obj = json.loads(text)
    except ValueError:
        raise ConfigError(f"{path} is not JSON: remove it or run `pcp local up` again") from None
    return obj if isinstance(obj, dict) else None


def resolve_from(flags: Mapping[str, str | None], env: Mapping[str, str]) -> Config:
    """`resolve` with the outputs file (flag `outputs`, env PCP_OUTPUTS) and local dir read."""
    outputs_path = _text(flags.get("outputs")) or _text(env.get("PCP_OUTPUTS"))
    outputs = load_outputs(outputs_path) if outputs_path else None
    directory = local_dir(env)
    return resolve(flags, env, outputs, lambda stack: read_local_state(directory, stack))
