"""Settings for the functions and the CLI, from environment variables, checked at cold start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from pcp.core.errors import PermanentError
from pcp.core.images import parse_image
from pcp.core.messages import DEFAULT_LAYOUT, GpuIdle, validate_layout, validate_wandb
from pcp.core.names import Names
from pcp.core.policy import Policy

REQUIRED = ("PCP_STACK", "PCP_PROJECT", "PCP_ZONE", "PCP_BUCKET", "PCP_WORKER_COUNT",
            "PCP_SHEPHERD_HOST")
#: The longest an event-driven function may run (2nd gen), and the default when the deploy
#: does not say: the Pulumi program passes each function's own timeout.
DEFAULT_FUNCTION_TIMEOUT_SECONDS = 540.0
#: What an invocation keeps for itself after the last Compute Engine wait: saving the stack
#: document, publishing, logging. The fleet's operation timeout is the function's timeout
#: minus this, so a slow operation fails inside the invocation instead of being cut off.
FUNCTION_TIMEOUT_MARGIN_SECONDS = 30.0


class SettingsError(RuntimeError):
    """A missing or malformed setting; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    stack: str
    project: str
    zone: str
    bucket: str
    policy: Policy
    compute_endpoint: str | None = None  # the local replica's Compute endpoint
    function_timeout_seconds: float = DEFAULT_FUNCTION_TIMEOUT_SECONDS

    @property
    def operation_timeout_seconds(self) -> float:
        """How long the fleet may wait for Compute Engine: the function's timeout less the
        margin, never more (from_env refuses a timeout that leaves nothing)."""
        return self.function_timeout_seconds - FUNCTION_TIMEOUT_MARGIN_SECONDS

    def topic(self, kind: str) -> str:
        """Topic names are fixed by the Pulumi program: pcp-<stack>-<kind>."""
        return Names(self.stack).topic(kind)

    @property
    def shepherd_subscription(self) -> str:
        return Names(self.stack).shepherd_subscription

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        missing = [k for k in REQUIRED if not env.get(k)]
        if missing:
            raise SettingsError(f"missing environment variable(s): {', '.join(missing)}")

        def number(key: str, default: float) -> float:
            raw = env.get(key, "")
            if raw == "":
                return default
            try:
                value = float(raw)
            except ValueError:
                raise SettingsError(f"{key} must be a number, got {raw!r}") from None
            if value < 0:
                raise SettingsError(f"{key} must not be negative, got {raw!r}")
            return value

        count = number("PCP_WORKER_COUNT", 0)
        if count < 1 or count != int(count):
            raise SettingsError(f"PCP_WORKER_COUNT must be a whole number >= 1, got "
                                f"{env['PCP_WORKER_COUNT']!r}")
        timeout = number("PCP_FUNCTION_TIMEOUT_SECONDS", DEFAULT_FUNCTION_TIMEOUT_SECONDS)
        if timeout <= FUNCTION_TIMEOUT_MARGIN_SECONDS:
            raw = env["PCP_FUNCTION_TIMEOUT_SECONDS"]
            raise SettingsError(f"PCP_FUNCTION_TIMEOUT_SECONDS must be more than "
                                f"{FUNCTION_TIMEOUT_MARGIN_SECONDS:g} (the margin kept after "
                                f"Compute Engine waits), got {raw!r}")
        stack = env["PCP_STACK"]
        try:
            gpu_idle = (GpuIdle.parse(env["PCP_GPU_IDLE"], "PCP_GPU_IDLE")
                        if env.get("PCP_GPU_IDLE") else None)
        except PermanentError as e:
            raise SettingsError(str(e)) from None
        max_cost = number("PCP_MAX_COST_USD", 0) or None
        worker_price = number("PCP_WORKER_HOURLY_USD", 0)
        if max_cost is not None and worker_price <= 0 and not number("PCP_SHEPHERD_HOURLY_USD", 0):
            raise SettingsError("PCP_MAX_COST_USD needs the hourly prices "
                                "(PCP_WORKER_HOURLY_USD) to become a deadline")
        threshold = number("PCP_BUDGET_STOP_THRESHOLD", 1.0)
        if not 0 < threshold <= 10:
            raise SettingsError(f"PCP_BUDGET_STOP_THRESHOLD must be a fraction of the budget "
                                f"in (0, 10], got {env['PCP_BUDGET_STOP_THRESHOLD']!r}")
        policy = Policy(
            stack=stack,
            worker_count=int(count),
            shepherd_host=env["PCP_SHEPHERD_HOST"],
            tcp_port=int(number("PCP_TCP_PORT", 9000)),
            max_run_hours=number("PCP_MAX_RUN_HOURS", 6),
            boot_timeout_minutes=number("PCP_BOOT_TIMEOUT_MINUTES", 15),
            keep_alive_hours=number("PCP_KEEP_ALIVE_HOURS", 2),
            sweep_interval_minutes=number("PCP_SWEEP_INTERVAL_MINUTES", 5),
            first_boot_grace_minutes=number("PCP_FIRST_BOOT_GRACE_MINUTES", 30),
            default_binary=env.get("PCP_BINARY") or None,
            default_image=_image_setting(env.get("PCP_IMAGE") or None),
            default_layout=validate_layout(env.get("PCP_LAYOUT") or None, "PCP_LAYOUT")
            or DEFAULT_LAYOUT,
            default_wandb_project=validate_wandb(env.get("PCP_WANDB_PROJECT") or None,
                                                 "wandb_project", "PCP_WANDB_PROJECT"),
            default_wandb_entity=validate_wandb(env.get("PCP_WANDB_ENTITY") or None,
                                                "wandb_entity", "PCP_WANDB_ENTITY"),
            worker_hourly_usd=number("PCP_WORKER_HOURLY_USD", 0),
            shepherd_hourly_usd=number("PCP_SHEPHERD_HOURLY_USD", 0),
            default_gpu_idle=gpu_idle,
            max_cost_usd=max_cost,
            budget_id=env.get("PCP_BUDGET_ID") or None,
            billing_account=env.get("PCP_BILLING_ACCOUNT") or None,
            budget_stop_threshold=threshold,
        )
        return cls(stack=stack, project=env["PCP_PROJECT"], zone=env["PCP_ZONE"],
                   bucket=env["PCP_BUCKET"], policy=policy,
                   compute_endpoint=env.get("PCP_COMPUTE_ENDPOINT") or None,
                   function_timeout_seconds=timeout)

    def to_env(self) -> dict[str, str]:
        """The environment `from_env` reads back into these settings: the one writer of the
        functions' contract (the Pulumi program and the local replica both call it)."""
        p = self.policy
        env = {
            "PCP_STACK": self.stack,
            "PCP_PROJECT": self.project,
            "PCP_ZONE": self.zone,
            "PCP_BUCKET": self.bucket,
            "PCP_WORKER_COUNT": str(p.worker_count),
            "PCP_SHEPHERD_HOST": p.shepherd_host,
            "PCP_TCP_PORT": str(p.tcp_port),
            "PCP_MAX_RUN_HOURS": _num(p.max_run_hours),
            "PCP_BOOT_TIMEOUT_MINUTES": _num(p.boot_timeout_minutes),
            "PCP_KEEP_ALIVE_HOURS": _num(p.keep_alive_hours),
            "PCP_SWEEP_INTERVAL_MINUTES": _num(p.sweep_interval_minutes),
            "PCP_BINARY": p.default_binary or "",
            "PCP_IMAGE": p.default_image or "",
            "PCP_LAYOUT": p.default_layout,
            "PCP_WANDB_PROJECT": p.default_wandb_project or "",
            "PCP_WANDB_ENTITY": p.default_wandb_entity or "",
            "PCP_WORKER_HOURLY_USD": _num(p.worker_hourly_usd),
            "PCP_SHEPHERD_HOURLY_USD": _num(p.shepherd_hourly_usd),
            "PCP_FIRST_BOOT_GRACE_MINUTES": _num(p.first_boot_grace_minutes),
            "PCP_FUNCTION_TIMEOUT_SECONDS": _num(self.function_timeout_seconds),
        }
        if p.default_gpu_idle is not None:
            env["PCP_GPU_IDLE"] = p.default_gpu_idle.text
        if p.max_cost_usd is not None:
            env["PCP_MAX_COST_USD"] = _num(p.max_cost_usd)
        if p.budget_id:
            env["PCP_BUDGET_ID"] = p.budget_id
        if p.billing_account:
            env["PCP_BILLING_ACCOUNT"] = p.billing_account
        if p.budget_stop_threshold != 1.0:
            env["PCP_BUDGET_STOP_THRESHOLD"] = _num(p.budget_stop_threshold)
        if self.compute_endpoint:
            env["PCP_COMPUTE_ENDPOINT"] = self.compute_endpoint
        return env


def _num(value: float) -> str:
    """A number as from_env reads it back exactly (repr keeps every digit of a float)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _image_setting(value: str | None) -> str | None:
    """PCP_IMAGE: an OCI reference (pcp/core/images.py), or None."""
    if value is None:
        return None
    try:
        return str(parse_image(value, "PCP_IMAGE"))
    except PermanentError as e:
        raise SettingsError(str(e)) from None
