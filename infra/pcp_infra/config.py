"""Stack configuration: every `pcp:` key the program reads, parsed and validated once.

Each key is declared (with the same default) in `infra/Pulumi.yaml`; the infra tests check that
the two agree, and that the program reads no undeclared key. Pulumi config has no float type, so
the hourly prices are strings that are parsed here.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pcp.core import costs
from pcp.core.errors import PermanentError
from pcp.core.images import parse_image
from pcp.core.messages import LAYOUTS, WANDB_ENTITY_RE, WANDB_PROJECT_RE, GpuIdle
from pcp.core.names import (
    INSTALL_NVIDIA_DRIVER,
    META_CACHIX_CACHE,
    META_CACHIX_KEY,
    META_GPU_COUNT,
    META_NIX_INSTALLER,
    META_NIX_SUBSTITUTER,
    STACK_RE,
)
from pcp.core.policy import Policy
from pcp.settings import Settings

#: Sentinel for keys that have no default and must be set per stack.
REQUIRED = object()

#: Default of every `pcp:` key, as declared in Pulumi.yaml (REQUIRED = no default).
DEFAULTS: Mapping[str, Any] = {
    "worker_count": 1,
    "machine_type": "n1-standard-4",
    "gpu_type": "nvidia-tesla-t4",
    "gpu_count": 1,
    "zone": "us-central1-a",
    "region": "us-central1",
    "boot_image": (
        "projects/deeplearning-platform-release/global/images/family/common-cu129-ubuntu-2204-nvidia-580"
    ),
    "boot_disk_gb": 100,
    "spot": False,
    "external_ip": True,
    "shepherd_host": REQUIRED,
    "tcp_port": 9000,
    "worker_ports": "",
    "max_run_hours": 6,
    "boot_timeout_minutes": 15,
    "keep_alive_hours": 2,
    "results_retention_days": 30,
    "sweep_interval_minutes": 5,
    "binary": "",
    "image": "",
    "layout": "all-nodes",
    "github_repository": REQUIRED,
    "worker_hourly_usd": "0.54",
    "shepherd_hourly_usd": "0",
    "bucket_location": "US",
    "worker_ssh_source_ranges": ["35.235.240.0/20"],
    "allow_shepherd_from": [],
    "cachix_cache": "",
    "cachix_public_key": "",
    "nix_installer_url": "",
    "nix_substituter": "",
    "alert_email": "",
    "alert_pubsub_topic": "",
    "gpu_idle": "",
    "prices": "",
    "max_cost_usd": "",
    "billing_account": "",
    "monthly_budget_usd": "",
    "budget_stop_threshold": "1.0",
    "wandb_project": "",
    "wandb_entity": "",
}

#: Stack sizes are bounded by the design (1..15 workers); larger needs a deliberate change here.
MAX_WORKERS = 15

#: Width of the default worker-to-worker port range: tcp_port .. tcp_port + this.
DEFAULT_WORKER_PORT_SPAN = 100

#: Google's range for IAP TCP forwarding (the only default source of SSH).
IAP_RANGE = "35.235.240.0/20"

#: Machine families whose GPUs come pre-attached: `guest_accelerators` must not be listed.
ACCELERATOR_OPTIMIZED_PREFIXES = ("a2-", "a3-", "a4-", "g2-", "g4-")

_REPO_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_PORTS_RE = re.compile(r"^\d{1,5}(-\d{1,5})?$")
_PROJECT_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
# The patterns infra/bootstrap/worker-startup.sh applies to the same metadata values.
_CACHIX_CACHE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_CACHIX_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+:[A-Za-z0-9+/]+={0,2}$")
_INSTALLER_URL_RE = re.compile(r"^https://[A-Za-z0-9./_~+-]+$")
# Plain http is allowed: Nix checks every path against the trusted keys, not the transport.
_SUBSTITUTER_RE = re.compile(r"^https?://[A-Za-z0-9.:/_~+-]+$")
_BILLING_ACCOUNT_RE = re.compile(r"^[A-Z0-9]{6}-[A-Z0-9]{6}-[A-Z0-9]{6}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_TOPIC_RE = re.compile(
    r"^projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/topics/[A-Za-z][A-Za-z0-9._~%+-]{2,254}$"
)


class ConfigError(ValueError):
    """A `pcp:` value that cannot work; the message names the key."""


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"pcp:{key} must be true or false, got {value!r}")


def _parse_int(key: str, value: Any, lo: int, hi: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"pcp:{key} must be an integer, got {value!r}") from None
    if not lo <= number <= hi:
        raise ConfigError(f"pcp:{key} must be between {lo} and {hi}, got {number}")
    return number


def _parse_price(key: str, value: Any) -> float:
    try:
        price = float(str(value).strip())
    except ValueError:
        raise ConfigError(f"pcp:{key} must be a number (USD per hour), got {value!r}") from None
    if price < 0:
        raise ConfigError(f"pcp:{key} must not be negative, got {price}")
    return price


def _parse_usd(key: str, value: Any) -> float | None:
    """An optional positive dollar amount; empty is none."""
    text = str(value if value is not None else "").strip()
    if not text:
        return None
    try:
        amount = float(text)
    except ValueError:
        raise ConfigError(f"pcp:{key} must be a number of US dollars, got {value!r}") from None
    if not 0 < amount < 1e9:
        raise ConfigError(f"pcp:{key} must be a positive, finite number of US dollars, "
                          f"got {value!r}")
    return amount
def _parse_image(value: Any) -> str:
    """pcp:image: an OCI reference REGISTRY/REPO[:TAG][@sha256:...], or empty."""
    text = str(value or "").strip()
    if not text:
        return ""
    try:
        return str(parse_image(text, "pcp:image"))
    except PermanentError as e:
        raise ConfigError(str(e)) from None


def _parse_layout(value: Any) -> str:
    layout = str(value or "").strip()
    if layout not in LAYOUTS:
        raise ConfigError(f"pcp:layout must be one of {', '.join(LAYOUTS)}, got {value!r}")
    return layout


def _parse_cidrs(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        text = value.strip()
        items = json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p]
    else:
        items = list(value)
    cidrs = []
    for item in items:
        try:
            net = ipaddress.ip_network(str(item).strip(), strict=False)
        except ValueError:
            raise ConfigError(f"pcp:{key}: {item!r} is not a CIDR range") from None
        if net.prefixlen == 0:
            raise ConfigError(f"pcp:{key}: {item!r} opens the workers to the whole internet")
        cidrs.append(str(net))
    return tuple(cidrs)


def _parse_optional(key: str, value: Any, pattern: re.Pattern[str]) -> str:
    text = str(value or "").strip()
    if text and not pattern.match(text):
        raise ConfigError(f"pcp:{key} {text!r} does not match {pattern.pattern}")
    return text


def _parse_ports(key: str, value: str) -> tuple[str, ...]:
    specs = tuple(p.strip() for p in value.split(",") if p.strip())
    for spec in specs:
        if not _PORTS_RE.match(spec):
            raise ConfigError(f"pcp:{key}: {spec!r} is not a port or port range (a-b)")
        bounds = [int(b) for b in spec.split("-")]
        if not all(1 <= b <= 65535 for b in bounds) or bounds != sorted(bounds):
            raise ConfigError(f"pcp:{key}: {spec!r} is not a valid port range")
    return specs


@dataclass(frozen=True)
class StackConfig:
    """Everything the program needs to know about one stack."""

    stack: str
    project: str
    worker_count: int
    machine_type: str
    gpu_type: str
    gpu_count: int
    zone: str
    region: str
    boot_image: str
    boot_disk_gb: int
    spot: bool
    external_ip: bool
    shepherd_host: str
    tcp_port: int
    worker_ports: tuple[str, ...]
    max_run_hours: int
    boot_timeout_minutes: int
    keep_alive_hours: int
    results_retention_days: int
    sweep_interval_minutes: int
    binary: str
    github_repository: str
    layout: str
    worker_hourly_usd: float
    shepherd_hourly_usd: float
    bucket_location: str
    worker_ssh_source_ranges: tuple[str, ...]
    allow_shepherd_from: tuple[str, ...]
    cachix_cache: str
    cachix_public_key: str
    nix_installer_url: str
    nix_substituter: str
    alert_email: str = ""
    alert_pubsub_topic: str = ""
    #: The stack's default gpu_idle policy (`5%:15m:10m`), or None.
    gpu_idle: GpuIdle | None = None
    #: The standing-cost price table (pcp.core.costs.DEFAULT_PRICES with pcp:prices applied).
    prices: Mapping[str, float] | None = None
    max_cost_usd: float | None = None
    billing_account: str = ""
    monthly_budget_usd: float | None = None
    budget_stop_threshold: float = 1.0
    #: The stack's default OCI image (pcp:image), pinned to its digest at each run's start.
    image: str = ""
    wandb_project: str = ""
    wandb_entity: str = ""

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pulumi_config(cls) -> StackConfig:
        """Read `pcp:*` (and `gcp:project`) from the running Pulumi stack."""
        import pulumi

        pcp = pulumi.Config("pcp")
        raw: dict[str, Any] = {}
        for key, default in DEFAULTS.items():
            if default is REQUIRED:
                raw[key] = pcp.require(key)
            elif isinstance(default, list):
                value = pcp.get_object(key)
                raw[key] = default if value is None else value
            else:
                value = pcp.get(key)
                raw[key] = default if value is None else value
        project = pulumi.Config("gcp").require("project")
        return cls.from_mapping(stack=pulumi.get_stack(), project=project, values=raw)

    @classmethod
    def from_mapping(cls, *, stack: str, project: str, values: Mapping[str, Any]) -> StackConfig:
        """Parse and validate raw values (strings, or already-typed YAML values)."""
        unknown = set(values) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown pcp: keys {sorted(unknown)}")
        v = {k: (values[k] if k in values else DEFAULTS[k]) for k in DEFAULTS}
        missing = [k for k, val in v.items() if val is REQUIRED]
        if missing:
            raise ConfigError(f"missing required config: {', '.join('pcp:' + k for k in missing)}")

        if not STACK_RE.match(stack):
            raise ConfigError(
                f"stack name {stack!r} must be 1-12 lowercase letters/digits (it is part of "
                "service account ids, which are limited to 30 characters)"
            )
        if not _PROJECT_RE.match(project):
            raise ConfigError(f"gcp:project {project!r} is not a valid project id")

        zone = str(v["zone"]).strip()
        region = str(v["region"]).strip()
        if not zone.startswith(region + "-"):
            raise ConfigError(f"pcp:zone {zone!r} is not in pcp:region {region!r}")

        tcp_port = _parse_int("tcp_port", v["tcp_port"], 1024, 65535 - DEFAULT_WORKER_PORT_SPAN)
        worker_ports = _parse_ports("worker_ports", str(v["worker_ports"] or ""))
        if not worker_ports:
            worker_ports = (f"{tcp_port}-{tcp_port + DEFAULT_WORKER_PORT_SPAN}",)

        machine_type = str(v["machine_type"]).strip()
        gpu_type = str(v["gpu_type"] or "").strip()
        gpu_count = _parse_int("gpu_count", v["gpu_count"], 0, 16)
        accelerator_optimized = machine_type.startswith(ACCELERATOR_OPTIMIZED_PREFIXES)
        if gpu_count and not gpu_type and not accelerator_optimized:
            raise ConfigError("pcp:gpu_type must be set when pcp:gpu_count > 0")

        shepherd_host = str(v["shepherd_host"]).strip()
        if not shepherd_host:
            raise ConfigError("pcp:shepherd_host must not be empty")
        repo = str(v["github_repository"]).strip()
        if not _REPO_RE.match(repo):
            raise ConfigError(f"pcp:github_repository must be 'owner/repo', got {repo!r}")

        ssh_ranges = _parse_cidrs("worker_ssh_source_ranges", v["worker_ssh_source_ranges"])
        shepherd_from = _parse_cidrs("allow_shepherd_from", v["allow_shepherd_from"])
        has_key = bool(str(v["cachix_public_key"] or "").strip())
        if str(v["nix_substituter"] or "").strip() and not has_key:
            raise ConfigError("pcp:nix_substituter needs pcp:cachix_public_key, the key that "
                              "signs its paths (Nix refuses unsigned ones)")

        worker_hourly_usd = _parse_price("worker_hourly_usd", v["worker_hourly_usd"])
        shepherd_hourly_usd = _parse_price("shepherd_hourly_usd", v["shepherd_hourly_usd"])
        max_cost_usd = _parse_usd("max_cost_usd", v["max_cost_usd"])
        if max_cost_usd is not None and worker_hourly_usd == 0 and shepherd_hourly_usd == 0:
            raise ConfigError("pcp:max_cost_usd needs pcp:worker_hourly_usd: without prices a "
                              "cost cap cannot become a deadline")
        billing_account = _parse_optional("billing_account", v["billing_account"],
                                          _BILLING_ACCOUNT_RE)
        monthly_budget_usd = _parse_usd("monthly_budget_usd", v["monthly_budget_usd"])
        if bool(billing_account) != (monthly_budget_usd is not None):
            raise ConfigError("pcp:billing_account and pcp:monthly_budget_usd go together: set "
                              "both for a budget kill switch, or neither")
        threshold = _parse_usd("budget_stop_threshold", v["budget_stop_threshold"]) or 1.0
        if threshold > 10:
            raise ConfigError(f"pcp:budget_stop_threshold is a fraction of the budget (1.0 = "
                              f"all of it), got {threshold:g}")

        return cls(
            stack=stack,
            project=project,
            worker_count=_parse_int("worker_count", v["worker_count"], 1, MAX_WORKERS),
            machine_type=machine_type,
            gpu_type=gpu_type,
            gpu_count=gpu_count,
            zone=zone,
            region=region,
            boot_image=str(v["boot_image"]).strip(),
            boot_disk_gb=_parse_int("boot_disk_gb", v["boot_disk_gb"], 20, 65536),
            spot=_parse_bool("spot", v["spot"]),
            external_ip=_parse_bool("external_ip", v["external_ip"]),
            shepherd_host=shepherd_host,
            tcp_port=tcp_port,
            worker_ports=worker_ports,
            max_run_hours=_parse_int("max_run_hours", v["max_run_hours"], 1, 24 * 7),
            boot_timeout_minutes=_parse_int(
                "boot_timeout_minutes", v["boot_timeout_minutes"], 1, 240
            ),
            keep_alive_hours=_parse_int("keep_alive_hours", v["keep_alive_hours"], 0, 24 * 7),
            results_retention_days=_parse_int(
                "results_retention_days", v["results_retention_days"], 1, 3650
            ),
            sweep_interval_minutes=_parse_int(
                "sweep_interval_minutes", v["sweep_interval_minutes"], 1, 59
            ),
            binary=str(v["binary"] or "").strip(),
            image=_parse_image(v["image"]),
            github_repository=repo,
            layout=_parse_layout(v["layout"]),
            worker_hourly_usd=worker_hourly_usd,
            shepherd_hourly_usd=shepherd_hourly_usd,
            bucket_location=str(v["bucket_location"]).strip(),
            worker_ssh_source_ranges=ssh_ranges,
            allow_shepherd_from=shepherd_from,
            cachix_cache=_parse_optional("cachix_cache", v["cachix_cache"], _CACHIX_CACHE_RE),
            cachix_public_key=_parse_optional(
                "cachix_public_key", v["cachix_public_key"], _CACHIX_KEY_RE
            ),
            nix_installer_url=_parse_optional(
                "nix_installer_url", v["nix_installer_url"], _INSTALLER_URL_RE
            ),
            nix_substituter=_parse_optional(
                "nix_substituter", v["nix_substituter"], _SUBSTITUTER_RE
            ),
            gpu_idle=_parse_gpu_idle(v["gpu_idle"]),
            prices=_parse_prices(v["prices"], v["worker_hourly_usd"]),
            alert_email=_parse_optional("alert_email", v["alert_email"], _EMAIL_RE),
            alert_pubsub_topic=_parse_optional(
                "alert_pubsub_topic", v["alert_pubsub_topic"], _TOPIC_RE
            ),
            max_cost_usd=max_cost_usd,
            billing_account=billing_account,
            monthly_budget_usd=monthly_budget_usd,
            budget_stop_threshold=threshold,
            wandb_project=_parse_optional("wandb_project", v["wandb_project"], WANDB_PROJECT_RE),
            wandb_entity=_parse_optional("wandb_entity", v["wandb_entity"], WANDB_ENTITY_RE),
        )

    # ------------------------------------------------------------------ derived values

    @property
    def accelerator_optimized(self) -> bool:
        """True for machine types with built-in GPUs (g2 + L4, a2 + A100, ...)."""
        return self.machine_type.startswith(ACCELERATOR_OPTIMIZED_PREFIXES)

    @property
    def attach_guest_accelerators(self) -> bool:
        """Whether `guest_accelerators` is listed on the VMs (never for built-in GPUs)."""
        return self.gpu_count > 0 and not self.accelerator_optimized

    @property
    def budget_enabled(self) -> bool:
        """Whether the stack gets a Cloud Billing budget, its topic and its function."""
        return bool(self.billing_account) and self.monthly_budget_usd is not None

    @property
    def has_gpu(self) -> bool:
        return self.accelerator_optimized or self.gpu_count > 0

    def worker_gpu_metadata(self) -> dict[str, str]:
        """What a GPU worker's metadata says about its GPUs: the count the agent checks with
        nvidia-smi before a run (built-in GPUs: at least one), and `install-nvidia-driver`,
        which Deep Learning VM images that stage the driver (the older Debian families) read
        on the first boot; the current Ubuntu `-nvidia-580` families ship it installed."""
        if not self.has_gpu:
            return {}
        return {META_GPU_COUNT: str(self.gpu_count or 1), INSTALL_NVIDIA_DRIVER: "True"}

    def worker_bootstrap_metadata(self) -> dict[str, str]:
        """Optional metadata read by the worker startup script (only the keys that are set)."""
        optional = {
            META_CACHIX_CACHE: self.cachix_cache,
            META_CACHIX_KEY: self.cachix_public_key,
            META_NIX_INSTALLER: self.nix_installer_url,
            META_NIX_SUBSTITUTER: self.nix_substituter,
        }
        return {key: value for key, value in optional.items() if value}

    def function_environment(self, bucket_name: str, *, timeout_seconds: int,
                             budget_id: str | None = None) -> dict[str, str]:
        """The runtime environment of one Cloud Function (all values strings), written by
        `pcp.settings.Settings.to_env`, the same code that the functions read it back with.

        `timeout_seconds` is that function's own `service_config.timeout_seconds`, passed as
        PCP_FUNCTION_TIMEOUT_SECONDS so that the code can stop waiting before the platform
        kills it.
        """
        if timeout_seconds < 1:
            raise ConfigError(f"a function timeout must be positive, got {timeout_seconds}")
        policy = self.policy(budget_id)
        return Settings(stack=self.stack, project=self.project, zone=self.zone,
                        bucket=bucket_name, policy=policy,
                        function_timeout_seconds=timeout_seconds).to_env()

    def policy(self, budget_id: str | None = None) -> Policy:
        """The stack's Policy as the functions run with it (their environment says the same)."""
        return Policy(
            stack=self.stack, worker_count=self.worker_count, shepherd_host=self.shepherd_host,
            tcp_port=self.tcp_port, max_run_hours=self.max_run_hours,
            boot_timeout_minutes=self.boot_timeout_minutes,
            keep_alive_hours=self.keep_alive_hours,
            sweep_interval_minutes=self.sweep_interval_minutes,
            default_binary=self.binary or None, default_layout=self.layout,
            default_image=self.image or None,
            default_wandb_project=self.wandb_project or None,
            default_wandb_entity=self.wandb_entity or None,
            worker_hourly_usd=self.worker_hourly_usd,
            shepherd_hourly_usd=self.shepherd_hourly_usd, default_gpu_idle=self.gpu_idle,
            max_cost_usd=self.max_cost_usd,
            budget_id=budget_id, billing_account=self.billing_account or None,
            budget_stop_threshold=self.budget_stop_threshold)


def _parse_gpu_idle(raw: object) -> GpuIdle | None:
    text = str(raw or "").strip()
    if not text:
        return None
    try:
        return GpuIdle.parse(text, "pcp:gpu_idle")
    except PermanentError as e:
        raise ConfigError(str(e)) from None


def _parse_prices(raw: object, worker_hourly: object) -> dict[str, float]:
    """pcp:prices (a JSON object, or one in YAML) over the default table; `worker_hour` is
    the stack's worker_hourly_usd unless pcp:prices names it."""
    if isinstance(raw, str) and raw.strip():
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"pcp:prices must be an object of prices: {e}") from None
    given = dict(raw) if isinstance(raw, Mapping) else {}
    if raw not in ("", None) and not isinstance(raw, Mapping):
        raise ConfigError("pcp:prices must be an object of prices, e.g. {\"pd-balanced\": 0.1}")
    given.setdefault("worker_hour", _parse_price("worker_hourly_usd", worker_hourly))
    try:
        return costs.prices(given, "pcp:prices")
    except PermanentError as e:
        raise ConfigError(str(e)) from None
