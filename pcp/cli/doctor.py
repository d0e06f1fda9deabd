"""`pcp doctor`: is this stack ready to run training, and is the safety net armed?

Each check says ✓, ✗ or – (not applicable here) with a reason a person can act on. The
Cloud Functions themselves are not inspected (google-cloud-functions is not a dependency);
the topics and the scheduler job that drive them are.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from pcp.cli.context import NO_CREDENTIALS, Context, ReplicaDown
from pcp.cli.errors import EXIT_FAILED
from pcp.cli.options import context, echo_json, resources
from pcp.cli.views import load_state
from pcp.core.errors import PermanentError
from pcp.core.names import SHEPHERD_CREDENTIALS_FILE, STACK_DOC, Names
from pcp.core.state import StackState

TOPIC_KINDS = ("start", "stop", "sweep", "shepherd")
#: Regional quotas a stack's start needs besides its GPUs: the workers' vCPUs, their boot
#: disks (pd-ssd and pd-balanced count as SSD_TOTAL_GB), and an external address each.
QUOTA_METRICS = ("CPUS", "SSD_TOTAL_GB", "DISKS_TOTAL_GB", "IN_USE_ADDRESSES")
GPU_QUOTA_RE = re.compile(r"^(PREEMPTIBLE_)?NVIDIA_[A-Z0-9_]+_GPUS$")


@dataclass(frozen=True)
class Check:
    name: str
    state: str  # "ok", "fail" or "skip"
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _api_error(e: Exception) -> str:
    message = getattr(e, "message", None) or str(e)
    return message.splitlines()[0] if message else type(e).__name__


def run_checks(ctx: Context) -> list[Check]:
    from google.api_core.exceptions import Forbidden, GoogleAPICallError, NotFound
    from google.auth.exceptions import DefaultCredentialsError, RefreshError

    checks: list[Check] = []
    if ctx.config is not None and ctx.config.local and ctx.config.supervisor:
        from pcp.cli.supervisor import supervisor_health

        problem = ctx.replica_problem()
        if problem is not None:
            checks.append(Check("local replica", "fail", problem))
            rest = ("credentials", "bucket", "stack state", "topics", "scheduler job", "quotas")
            return checks + [Check(name, "skip", "not checked: the local replica is down")
                             for name in rest]
        checks.append(Check("local replica", "ok",
                            supervisor_health(ctx.config.supervisor, ctx.clock())))
    try:
        checks.append(Check("credentials", "ok", ctx.credentials()))
    except DefaultCredentialsError:
        checks.append(Check("credentials", "fail", NO_CREDENTIALS))
        rest = ("bucket", "stack state", "topics", "scheduler job", "quotas")
        checks += [Check(name, "skip", "not checked without credentials") for name in rest]
        return checks

    bucket = ctx.bucket
    try:
        ctx.store.list(STACK_DOC)  # one object at most: the bucket answers, or it does not
        checks.append(Check("bucket", "ok", f"{bucket} is reachable"))
        state = load_state(ctx.store)
        detail = ("no run yet (control/stack.json not written)" if state is None else
                  f"readable: {'1 active run' if state.active else 'no active run'}, "
                  f"{len(state.queue)} queued")
        checks.append(Check("stack state", "ok", detail))
        checks.append(budget_check(state, ctx.stack))
    except NotFound:
        checks.append(Check("bucket", "fail", f"{bucket} does not exist: run `pulumi up` "
                                              "for this stack"))
        checks.append(Check("stack state", "skip", "no bucket"))
    except (Forbidden, RefreshError) as e:
        checks.append(Check("bucket", "fail", f"{bucket}: access denied: {_api_error(e)}"))
        checks.append(Check("stack state", "skip", "no access to the bucket"))
    except PermanentError as e:
        checks.append(Check("bucket", "ok", f"{bucket} is reachable"))
        checks.append(Check("stack state", "fail", str(e)))
    except (GoogleAPICallError, OSError, ReplicaDown) as e:
        checks.append(Check("bucket", "fail", f"{bucket}: {_api_error(e)}"))
        checks.append(Check("stack state", "skip", "bucket not reachable"))

    try:
        publisher = ctx.publisher
    except ReplicaDown as e:
        checks.append(Check("topics", "fail", str(e)))
        publisher = None
    if publisher is None or ctx.config is None:
        if checks[-1].name != "topics":
            checks.append(Check("topics", "skip", "no Pub/Sub client in this context"))
    else:
        missing, errors = [], []
        for kind in TOPIC_KINDS:
            try:
                publisher.get_topic(topic=ctx.config.topic_path(kind))
            except NotFound:
                missing.append(ctx.topic(kind))
            except (GoogleAPICallError, RefreshError, OSError) as e:
                errors.append(f"{ctx.topic(kind)}: {_api_error(e)}")
        names = ", ".join(ctx.topic(k) for k in TOPIC_KINDS)
        if missing:
            checks.append(Check("topics", "fail", f"missing: {', '.join(missing)}"))
        elif errors:
            checks.append(Check("topics", "fail", "; ".join(errors)))
        else:
            checks.append(Check("topics", "ok", f"{names} exist"))

    checks.append(_scheduler_check(ctx))
    checks.append(_quota_check(ctx))
    checks.append(_standing_cost_check(ctx))
    checks.append(Check("functions", "skip", "not inspected (google-cloud-functions is not a "
                                             "dependency); their topics and scheduler job are"))
    checks.append(Check("github environment", "skip",
                        f"{Names(ctx.stack).github_environment}: the environment train.yml and "
                        "shepherd.yml run in for this stack, holding its variables and "
                        "secrets (docs/workflows.md); pcp cannot read GitHub to check it"))
    checks.append(_shepherd_credentials_check())
    return checks


def _standing_cost_check(ctx: Context) -> Check:
    """What the idle fleet bills (disks, addresses, NAT) per day and month, and the month's
    runs, read from Compute Engine and priced by the stack's table (`pcp cost`)."""
    from pcp.cli.cost import doctor_line
    from pcp.core.errors import PermanentError

    try:
        state, text = doctor_line(ctx)
    except PermanentError as e:
        return Check("standing cost", "fail", str(e))
    except Exception as e:  # noqa: BLE001 - the other checks must still print
        return Check("standing cost", "fail", f"{type(e).__name__}: {e}")
    return Check("standing cost", state, text)
def budget_check(state: StackState | None, stack: str) -> Check:
    """The budget kill switch: a hold stops every VM and refuses starts until lifted."""
    budget = state.budget if state is not None else None
    if budget is None or budget.hold is None:
        lifted = (f"; last lifted {budget.lifted_at:%Y-%m-%d %H:%M}Z"
                  f"{' by ' + budget.lifted_by if budget.lifted_by else ''}"
                  if budget is not None and budget.lifted_at is not None else "")
        return Check("budget", "ok", f"no budget hold{lifted}")
    hold = budget.hold
    return Check("budget", "fail", f"on budget hold since {hold.since:%Y-%m-%d %H:%M}Z "
                 f"({hold.text}): every VM is stopped and no run starts; lift it with "
                 f"`pcp budget resume --stack {stack}`")


def _quota_check(ctx: Context) -> Check:
    """Compute Engine's regional quotas: vCPUs, disks, addresses and the NVIDIA GPUs."""
    from google.api_core.exceptions import Forbidden, GoogleAPICallError, NotFound
    from google.auth.exceptions import RefreshError

    name = "quotas"
    if ctx.local:
        return Check(name, "skip", "no Compute Engine quotas in the local replica"
                     if ctx.config else "no Compute Engine in this context")
    config = ctx.config
    compute = ctx.compute
    if compute is None or config is None:
        return Check(name, "skip", "no Compute Engine client in this context")
    if not config.region:
        return Check(name, "fail", "region unknown: pass --region, set PCP_REGION or pass "
                                   "--outputs")
    try:
        region = compute.get(config.project, config.region)
    except NotFound:
        return Check(name, "fail", f"region {config.region} of project {config.project} does "
                                   "not exist (or the Compute Engine API is not enabled)")
    except Forbidden as e:
        return Check(name, "fail", f"cannot read the quotas of {config.region}: "
                                   f"{_api_error(e)} (needs compute.regions.get, e.g. "
                                   "roles/compute.viewer)")
    except (GoogleAPICallError, RefreshError, OSError, ValueError) as e:
        return Check(name, "fail", f"{config.region}: {_api_error(e)}")
    quotas = {str(q.get("metric")): (float(q.get("usage", 0)), float(q.get("limit", 0)))
              for q in region.get("quotas", []) if isinstance(q, dict)}
    shown = [m for m in QUOTA_METRICS if m in quotas]
    gpus = sorted(m for m in quotas if GPU_QUOTA_RE.match(m))
    parts = [f"{m} {quotas[m][0]:g}/{quotas[m][1]:g}" for m in shown + gpus]
    summary = f"{config.region}: {', '.join(parts) or 'no quotas reported'}"
    if not any(quotas[m][1] > 0 for m in gpus):
        return Check(name, "fail", f"{summary}; no NVIDIA GPU quota in this region: the GPU "
                                   "workers cannot start (request NVIDIA_<type>_GPUS quota, "
                                   "and GPUS_ALL_REGIONS for the project)")
    full = [m for m in shown + gpus if quotas[m][1] > 0 and quotas[m][0] >= quotas[m][1]]
    if full:
        return Check(name, "fail", f"{summary}; at the limit: {', '.join(full)} (a start "
                                   "that needs more will be refused)")
    return Check(name, "ok", summary)


def _shepherd_credentials_check(path: str = SHEPHERD_CREDENTIALS_FILE) -> Check:
    """On the shepherd Mac: which credential the daemon uses (its installed file's type)."""
    from pcp.cli.context import describe_credential_file

    name = "shepherd credentials"
    if not Path(path).exists():
        return Check(name, "skip", f"no {path} here (not the shepherd host)")
    detail = describe_credential_file(path)
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") not in (None, "", path):
        detail += "; this command itself uses GOOGLE_APPLICATION_CREDENTIALS, not that file"
    return Check(name, "ok", f"the shepherd daemon uses {detail}")


def _scheduler_check(ctx: Context) -> Check:
    from google.api_core.exceptions import GoogleAPICallError, NotFound
    from google.auth.exceptions import RefreshError

    name = "scheduler job"
    if ctx.local:
        where = "the local replica; its ticker publishes the sweep ticks" if ctx.config \
            else "this context"
        return Check(name, "skip", f"no Cloud Scheduler in {where}")
    job_name = ctx.job_name
    if job_name is None:
        return Check(name, "fail", "region unknown: pass --region, set PCP_REGION or pass "
                                   "--outputs")
    scheduler = ctx.scheduler
    if scheduler is None:
        return Check(name, "skip", "no Cloud Scheduler client in this context")
    try:
        job = scheduler.get_job(name=job_name)
    except NotFound:
        return Check(name, "fail", f"{job_name} does not exist: the sweeper never runs, so "
                                   "nothing backs up the event-driven stop")
    except (GoogleAPICallError, RefreshError, OSError) as e:
        return Check(name, "fail", f"{job_name}: {_api_error(e)}")
    from google.cloud import scheduler_v1

    state = scheduler_v1.Job.State(job.state)
    if state is scheduler_v1.Job.State.ENABLED:
        schedule = f" ({job.schedule})" if job.schedule else ""
        return Check(name, "ok", f"{job_name} is ENABLED{schedule}: the safety net is armed")
    return Check(name, "fail", f"{job_name} is {state.name}: the safety net is NOT armed; "
                               f"resume it with `gcloud scheduler jobs resume`")


@click.command()
@resources
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def doctor(as_json: bool) -> None:
    """Check credentials, bucket, topics and that the scheduler job (safety net) is armed."""
    from pcp.cli.render import MARK

    ctx = context()
    checks = run_checks(ctx)
    failed = any(c.state == "fail" for c in checks)
    if as_json:
        echo_json({"stack": ctx.stack, "ok": not failed, "checks": [c.to_dict() for c in checks]})
    else:
        click.echo(f"pcp doctor: stack {ctx.stack} ({ctx.bucket})")
        for c in checks:
            click.echo(f"  {MARK[c.state]} {c.name}: {c.detail}")
    if failed:
        raise click.exceptions.Exit(EXIT_FAILED)
