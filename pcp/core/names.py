"""Every name pcp gives a thing, in one place: cloud resources, bucket objects, labels, metadata.

The functions, the agent, the CLI, the local replica and the Pulumi program all import these,
so a name is spelled once. Standard library only (the core's rule), so the Pulumi program and
the agent can import it without the clients. docs/architecture.md lists the layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The stacks and their worker counts.
STACK_SIZES = {"tiny": 1, "small": 3, "large": 7, "huge": 15}
STACKS = tuple(STACK_SIZES)

#: A stack name: short enough that every derived name fits its cloud limit (service account
#: ids are 6-30 characters: `pcp-<stack>-functions`; workload identity pools 4-32).
STACK_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")

# ---------------------------------------------------------------- nodes

SHEPHERD = "shepherd"
WORKER_PREFIX = "worker-"
NODE_RE = re.compile(r"^(shepherd|worker-(0|[1-9][0-9]{0,2}))$")


def worker_node(index: int) -> str:
    """The node name of worker `index`: worker-0, worker-1, ..."""
    return f"{WORKER_PREFIX}{index}"


def worker_index(node: str) -> int | None:
    """The index of a worker node name; None for the shepherd or anything else."""
    rest = node.removeprefix(WORKER_PREFIX)
    if rest == node or not rest.isdigit() or (len(rest) > 1 and rest[0] == "0"):
        return None
    return int(rest)


def node_names(worker_count: int) -> tuple[str, ...]:
    """The shepherd first, then every worker, in rank order."""
    return (SHEPHERD, *(worker_node(i) for i in range(worker_count)))


# ---------------------------------------------------------------- bucket objects

CONTROL = "control/"
STACK_DOC = "control/stack.json"
#: The stack's limits and prices as the functions run with them (written at deploy time, by the
#: Pulumi program or the local replica): what `pcp run` reads to show a run's deadline first.
POLICY_DOC = "control/policy.json"
SWEEPS = "control/sweeps/"
#: A sweep audit's object metadata: the kinds and heals of its notes, space-separated.
AUDIT_KINDS = "pcp-kinds"
REJECTED = "control/rejected/"
RUNS = "runs/"
MARKERS = "markers/"
AGENT_OBJECT = "agent/pcp-agent.tar.gz"
MARKER_KINDS = ("booted", "done")
MARKER_PATH_RE = re.compile(r"^markers/([^/]+)/([^/]+)/(booted|done)\.json$")


def corrupt_stack_doc(generation: int) -> str:
    """Where an unreadable stack document is set aside before the sweeper rebuilds it."""
    return f"control/stack.corrupt-{generation}.json"


def run_prefix(run_id: str) -> str:
    """Everything a run leaves in the bucket, but its markers: runs/<run_id>/."""
    return f"{RUNS}{run_id}/"


def run_doc(run_id: str) -> str:
    """The run's archived record, written when it ends."""
    return f"{RUNS}{run_id}/run.json"


def summary_doc(run_id: str) -> str:
    """The run's summary (outcome, nodes, metrics), written when it ends."""
    return f"{RUNS}{run_id}/summary.json"


def node_prefix(run_id: str, node: str) -> str:
    """A node's logs, heartbeat and outputs: runs/<run_id>/<node>/."""
    return f"{RUNS}{run_id}/{node}/"


def node_file(run_id: str, node: str, name: str) -> str:
    """One file a node uploads, e.g. node_file(r, "shepherd", "metrics.json")."""
    return f"{node_prefix(run_id, node)}{name}"


def markers_prefix(run_id: str) -> str:
    return f"{MARKERS}{run_id}/"


def marker_path(run_id: str, node: str, kind: str) -> str:
    """markers/<run_id>/<node>/<booted|done>.json: the only objects that raise events."""
    return f"{MARKERS}{run_id}/{node}/{kind}.json"


def power_off_doc(run_id: str, node: str) -> str:
    """What a node's dead-man switch recorded just before it powered its VM off."""
    return node_file(run_id, node, "power_off.json")


def sweep_doc(stamp: str) -> str:
    """One sweep's audit record."""
    return f"{SWEEPS}{stamp}.json"


def rejection_doc(stamp: str, kind: str, message_id: str) -> str:
    """A rejected event that is not a start request (those become rejected runs)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", message_id)[:100] or "unknown"
    return f"{REJECTED}{stamp}-{kind}-{safe}.json"


# ---------------------------------------------------------------- labels and metadata

LABEL_STACK = "pcp-stack"
LABEL_RUN = "pcp-run"
LABEL_ATTEMPT = "pcp-attempt"
LABEL_DEADLINE = "pcp-deadline"
LABEL_KEEP_ALIVE = "pcp-keep-alive-until"
LABEL_ROLE = "pcp-role"
LABEL_NODE = "pcp-node"
LABEL_FUNCTION = "pcp-function"

#: Worker instance metadata: the node's assignment (JSON), written before every start.
ASSIGNMENT_KEY = "pcp-assignment"
#: Instance metadata written by the Pulumi program, read by the startup script and the agent.
META_STACK = "pcp-stack"
META_BUCKET = "pcp-bucket"
META_PROJECT = "pcp-project"
META_NODE = "pcp-node"
META_CACHIX_CACHE = "pcp-cachix-cache"
META_CACHIX_KEY = "pcp-cachix-public-key"
META_NIX_INSTALLER = "pcp-nix-installer-url"
META_NIX_SUBSTITUTER = "pcp-nix-substituter"
#: GPUs per worker on a GPU stack (absent or 0: none). The agent checks them before a run.
META_GPU_COUNT = "pcp-gpu-count"
#: Read by Deep Learning VM images that install their NVIDIA driver on the first boot.
INSTALL_NVIDIA_DRIVER = "install-nvidia-driver"
#: Object metadata on a marker: the marker describes itself, so the function need not read it.
MARKER_METADATA_KEY = "pcp-marker"
#: Pub/Sub message attributes.
ATTR_RUN_ID = "run_id"
ATTR_STACK = "pcp-stack"
ATTR_SOURCE = "pcp-source"


# ---------------------------------------------------------------- GitHub

#: The workflow that deploys a stack and requests runs; the only one the stack's workload
#: identity provider accepts tokens from.
TRAIN_WORKFLOW = ".github/workflows/train.yml"
#: Prefix of the GitHub environment of each stack (`training-<stack>`).
GITHUB_ENVIRONMENT_PREFIX = "training-"

# ---------------------------------------------------------------- the shepherd Mac

#: Where install.sh puts the shepherd's credential file (a service account key or a workload
#: identity federation configuration); the launchd plist points GOOGLE_APPLICATION_CREDENTIALS
#: at it.
SHEPHERD_CREDENTIALS_FILE = "/etc/pcp/shepherd-key.json"



# ---------------------------------------------------------------- cloud resources


@dataclass(frozen=True)
class Names:
    """Every cloud name of one stack. `project` is needed only for the bucket."""

    stack: str
    project: str = ""

    @property
    def prefix(self) -> str:
        return f"pcp-{self.stack}"

    # storage
    @property
    def bucket(self) -> str:
        # Bucket names are global: the project id keeps them unique.
        return f"{self.prefix}-{self.project}"

    # messaging
    def topic(self, kind: str) -> str:
        """kind: start | stop | sweep | shepherd | markers | dead-letter."""
        return f"{self.prefix}-{kind}"

    @property
    def shepherd_subscription(self) -> str:
        return f"{self.prefix}-shepherd-host"

    @property
    def dead_letter_subscription(self) -> str:
        return f"{self.prefix}-dead-letter"

    # compute
    def worker_vm(self, index: int) -> str:
        return f"{self.prefix}-worker-{index}"

    def vm_of(self, node: str) -> str | None:
        """The VM a node runs on; None for the shepherd (not a VM of ours)."""
        index = worker_index(node)
        return None if index is None else self.worker_vm(index)

    def node_of_vm(self, vm: str) -> str | None:
        """The node a VM of this stack runs; None for any other name."""
        rest = vm.removeprefix(f"{self.prefix}-")
        return rest if rest != vm and worker_index(rest) is not None else None

    @property
    def worker_tag(self) -> str:
        return f"{self.prefix}-worker"

    @property
    def network(self) -> str:
        return f"{self.prefix}-net"

    @property
    def subnetwork(self) -> str:
        return f"{self.prefix}-workers"

    @property
    def egress_address(self) -> str:
        """The reserved address the workers' Cloud NAT sends from (pcp:external_ip false)."""
        return f"{self.prefix}-egress"

    # functions and scheduler
    def function(self, kind: str) -> str:
        """kind: start | stop | marker | sweep."""
        return f"{self.prefix}-{kind}"

    @property
    def scheduler_job(self) -> str:
        return f"{self.prefix}-sweep"

    def log_metric(self, what: str) -> str:
        """A log-based metric (infra/pcp_infra/monitoring.py): pcp-S-<what>."""
        return f"{self.prefix}-{what}"

    @property
    def wandb_secret(self) -> str:
        """The Secret Manager secret holding the stack's wandb API key (infra/pcp_infra/
        secrets.py creates it empty; a person adds the version)."""
        return f"{self.prefix}-wandb-api-key"

    # identity
    def service_account_id(self, role: str) -> str:
        account_id = f"{self.prefix}-{role}"
        if not 6 <= len(account_id) <= 30:
            raise ValueError(f"service account id {account_id!r} must be 6-30 characters")
        return account_id

    def custom_role_id(self, purpose: str) -> str:
        # Role ids allow [a-zA-Z0-9_.] only.
        return f"pcp_{self.stack}_{purpose}".replace("-", "_")

    @property
    def workload_identity_pool(self) -> str:
        pool = f"{self.prefix}-github"
        if not 4 <= len(pool) <= 32:
            raise ValueError(f"workload identity pool id {pool!r} must be 4-32 characters")
        return pool

    @property
    def github_environment(self) -> str:
        """The GitHub environment the train workflow's job runs in for this stack."""
        return f"{GITHUB_ENVIRONMENT_PREFIX}{self.stack}"

    def labels(self, **extra: str) -> dict[str, str]:
        return {LABEL_STACK: self.stack, **extra}


#: The first word of the line a worker's dead-man switch writes to the serial console before
#: powering off (pcp/agent/deadman.py); the log-based metric `deadman-power-offs` matches it.
DEAD_MAN_CONSOLE_TAG = "pcp-dead-man-power-off"


def wandb_group_url(entity: str | None, project: str | None, run_id: str) -> str | None:
    """The wandb web page of a run's group (every node's wandb run, WANDB_RUN_GROUP = the run
    id): https://wandb.ai/ENTITY/PROJECT/groups/RUN_ID; None without an entity or project
    (wandb's default entity is the key's user, which pcp does not know)."""
    if not entity or not project:
        return None
    return f"https://wandb.ai/{entity}/{project}/groups/{run_id}"
