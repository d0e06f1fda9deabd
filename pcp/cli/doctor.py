"""`pcp doctor`: is this stack ready to run training, and is the safety net armed?

Each check says ✓, ✗ or – (not applicable here) with a reason a person can act on. The
Cloud Functions themselves are not inspected (google-cloud-functions is not a dependency);
the topics and the scheduler job that drive them are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import click

from pcp.cli.context import NO_CREDENTIALS, Context, ReplicaDown
from pcp.cli.errors import EXIT_FAILED
from pcp.cli.options import context, echo_json, resources
from pcp.cli.views import load_state
from pcp.core.errors import PermanentError

TOPIC_KINDS = ("start", "stop", "sweep", "shepherd")


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
    try:
        checks.append(Check("credentials", "ok", ctx.credentials()))
    except DefaultCredentialsError:
        checks.append(Check("credentials", "fail", NO_CREDENTIALS))
        rest = ("bucket", "stack state", "topics", "scheduler job")
        checks += [Check(name, "skip", "not checked without credentials") for name in rest]
        return checks

    bucket = ctx.bucket
    try:
        ctx.store.list("control/")
        checks.append(Check("bucket", "ok", f"{bucket} is reachable"))
        state = load_state(ctx.store)
        detail = ("no run yet (control/stack.json not written)" if state is None else
                  f"readable: {'1 active run' if state.active else 'no active run'}, "
                  f"{len(state.queue)} queued")
        checks.append(Check("stack state", "ok", detail))
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
    checks.append(Check("functions", "skip", "not inspected (google-cloud-functions is not a "
                                             "dependency); their topics and scheduler job are"))
    return checks


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
