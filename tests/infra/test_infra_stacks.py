"""The Pulumi program under mocks, one pass per stack: the safety properties of what it declares.

Everything here is asserted on what the Pulumi engine would receive (resource inputs and
options). What mocks cannot show: whether GCP accepts these values, provider-side defaults and
diffs, IAM propagation, and the engine's handling of ignore_changes at update time.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pcp_infra.network import WORKER_SUBNET_CIDR

pytestmark = pytest.mark.infra

INFRA = Path(__file__).resolve().parents[2] / "infra"

INSTANCE = "gcp:compute/instance:Instance"
FUNCTION = "gcp:cloudfunctionsv2/function:Function"
BUCKET = "gcp:storage/bucket:Bucket"
BUCKET_OBJECT = "gcp:storage/bucketObject:BucketObject"
NOTIFICATION = "gcp:storage/notification:Notification"
TOPIC = "gcp:pubsub/topic:Topic"
SUBSCRIPTION = "gcp:pubsub/subscription:Subscription"
JOB = "gcp:cloudscheduler/job:Job"
FIREWALL = "gcp:compute/firewall:Firewall"
SERVICE = "gcp:projects/service:Service"
PROJECT_MEMBER = "gcp:projects/iAMMember:IAMMember"
SA_MEMBER = "gcp:serviceaccount/iAMMember:IAMMember"
BUCKET_MEMBER = "gcp:storage/bucketIAMMember:BucketIAMMember"
TOPIC_MEMBER = "gcp:pubsub/topicIAMMember:TopicIAMMember"
SUB_MEMBER = "gcp:pubsub/subscriptionIAMMember:SubscriptionIAMMember"
INSTANCE_MEMBER = "gcp:compute/instanceIAMMember:InstanceIAMMember"
RUN_MEMBER = "gcp:cloudrunv2/serviceIamMember:ServiceIamMember"
CUSTOM_ROLE = "gcp:projects/iAMCustomRole:IAMCustomRole"
POOL = "gcp:iam/workloadIdentityPool:WorkloadIdentityPool"
REPOSITORY = "gcp:artifactregistry/repository:Repository"
REPOSITORY_MEMBER = "gcp:artifactregistry/repositoryIamMember:RepositoryIamMember"
POOL_PROVIDER = "gcp:iam/workloadIdentityPoolProvider:WorkloadIdentityPoolProvider"

PRIMITIVE_ROLES = {"roles/owner", "roles/editor", "roles/viewer"}

PCP_ENV = {
    "PCP_STACK", "PCP_PROJECT", "PCP_ZONE", "PCP_BUCKET", "PCP_WORKER_COUNT",
    "PCP_SHEPHERD_HOST", "PCP_TCP_PORT", "PCP_MAX_RUN_HOURS", "PCP_BOOT_TIMEOUT_MINUTES",
    "PCP_KEEP_ALIVE_HOURS", "PCP_SWEEP_INTERVAL_MINUTES", "PCP_BINARY",
    "PCP_WORKER_HOURLY_USD", "PCP_SHEPHERD_HOURLY_USD", "PCP_FUNCTION_TIMEOUT_SECONDS",
    "PCP_FIRST_BOOT_GRACE_MINUTES", "PCP_LAYOUT", "PCP_IMAGE",
    "PCP_WANDB_PROJECT", "PCP_WANDB_ENTITY",
}  # fmt: skip

#: The event-driven maximum (Cloud Functions 2nd gen): every function may wait on VM stops,
#: and one GCE stop can take 120 s of guest soft-off alone.
EVENT_MAX = 540

#: function kind -> (entry point, topic kind, timeout seconds)
FUNCTIONS = {
    "start": ("on_start", "start", EVENT_MAX),
    "stop": ("on_stop", "stop", EVENT_MAX),
    "marker": ("on_marker", "markers", EVENT_MAX),
    "sweep": ("on_sweep", "sweep", EVENT_MAX),
}
#: Only on a stack with a budget (pcp:billing_account): the kill switch.
BUDGET_FUNCTIONS = {"budget": ("on_budget", "budget", EVENT_MAX)}


def functions_of(run):
    return FUNCTIONS | (BUDGET_FUNCTIONS if run.config.get("pcp:billing_account") else {})

SERVICE_IDENTITY = "gcp:projects/serviceIdentity:ServiceIdentity"
AGENT_SUFFIX = {"eventarc": "@gcp-sa-eventarc.iam.gserviceaccount.com",
                "pubsub": "@gcp-sa-pubsub.iam.gserviceaccount.com"}


def topic_id(run, kind: str) -> str:
    return f"projects/{run.config['gcp:project']}/topics/{run.prefix}-{kind}"


def iter_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from iter_strings(v)


# --------------------------------------------------------------------------- worker VMs


def test_worker_count_and_names(stack_run):
    vms = stack_run.of_type(INSTANCE)
    n = stack_run.expected_workers
    assert len(vms) == n
    expected = [f"{stack_run.prefix}-worker-{i}" for i in range(n)]
    assert sorted(vm["inputs"]["name"] for vm in vms) == sorted(expected)
    assert stack_run.outputs["vm_names"] == expected
    assert stack_run.outputs["worker_count"] == n


def test_every_worker_has_its_gpu(any_run):
    machine = any_run.config["pcp:machine_type"]
    for vm in any_run.of_type(INSTANCE):
        inputs = vm["inputs"]
        assert inputs["machineType"] == machine
        if machine.startswith("g2-"):
            # The L4 is built into g2 machine types: listing it again is not done.
            assert not inputs.get("guestAccelerators")
        else:
            assert inputs["guestAccelerators"] == [
                {
                    "type": any_run.config["pcp:gpu_type"],
                    "count": float(any_run.config["pcp:gpu_count"]),
                }
            ]
            assert inputs["guestAccelerators"][0]["count"] >= 1


def test_stack_machine_choices(stack_run):
    machine = stack_run.config["pcp:machine_type"]
    if stack_run.stack in ("tiny", "small"):
        assert machine.startswith("n1-") and stack_run.config["pcp:gpu_type"] == "nvidia-tesla-t4"
    else:
        assert machine.startswith("g2-") and stack_run.config["pcp:gpu_type"] == "nvidia-l4"


def test_worker_scheduling_is_gpu_safe(any_run):
    spot = any_run.config["pcp:spot"] == "true"
    for vm in any_run.of_type(INSTANCE):
        s = vm["inputs"]["scheduling"]
        assert s["onHostMaintenance"] == "TERMINATE"
        assert s["automaticRestart"] is False
        if spot:
            assert s["provisioningModel"] == "SPOT"
            assert s["preemptible"] is True
            assert s["instanceTerminationAction"] == "STOP"
        else:
            assert s["provisioningModel"] == "STANDARD"
            assert s.get("preemptible") is False
            # GCE rejects a termination action on STANDARD VMs without a run duration: the
            # control plane sets both before each start (and Pulumi ignores them).
            assert "instanceTerminationAction" not in s
        assert "maxRunDuration" not in s
        # Never set: the control plane alone starts and stops workers.
        assert "desiredStatus" not in vm["inputs"]


def test_workers_run_as_worker_sa(any_run):
    for vm in any_run.of_type(INSTANCE):
        assert vm["inputs"]["serviceAccount"] == {
            "email": any_run.sa_email("worker"),
            "scopes": ["cloud-platform"],
        }


def test_worker_external_ip_only_when_configured(any_run):
    external = any_run.config["pcp:external_ip"] == "true"
    for vm in any_run.of_type(INSTANCE):
        (nic,) = vm["inputs"]["networkInterfaces"]
        access = nic.get("accessConfigs") or []
        assert len(access) == (1 if external else 0)
        assert nic["subnetwork"].endswith(f"/subnetworks/{any_run.prefix}-workers")
        assert vm["inputs"]["tags"] == [f"{any_run.prefix}-worker"]
    nats = any_run.of_type("gcp:compute/routerNat:RouterNat")
    assert len(nats) == (0 if external else 1)


def test_default_stacks_have_external_ip_and_variant_has_nat(stack_run, variant):
    assert stack_run.config["pcp:external_ip"] == "true"
    (nat,) = variant.of_type("gcp:compute/routerNat:RouterNat")
    assert nat["inputs"]["sourceSubnetworkIpRangesToNat"] == "ALL_SUBNETWORKS_ALL_IP_RANGES"
    # One reserved address: the workers' single, stable egress IP, exported for the
    # shepherd host's firewall.
    (address,) = variant.of_type("gcp:compute/address:Address")
    assert address["inputs"]["name"] == f"{variant.prefix}-egress"
    assert address["inputs"]["addressType"] == "EXTERNAL"
    assert nat["inputs"]["natIpAllocateOption"] == "MANUAL_ONLY"
    assert len(nat["inputs"]["natIps"]) == 1
    assert "worker_egress_ip" in variant.outputs
    assert stack_run.outputs.get("worker_egress_ip") is None
    assert stack_run.of_type("gcp:compute/address:Address") == []
    # Workers are created after the NAT they need for their first boot.
    for vm in variant.of_type(INSTANCE):
        assert nat["urn"] in vm["dependencies"]


def test_worker_labels_and_metadata(any_run):
    startup = INFRA / "bootstrap" / "worker-startup.sh"
    for vm in any_run.of_type(INSTANCE):
        i = vm["inputs"]["name"].rsplit("-", 1)[1]
        assert vm["inputs"]["labels"] == {
            "pcp-stack": any_run.stack,
            "pcp-role": "worker",
            "pcp-node": f"worker-{i}",
        }
        md = vm["inputs"]["metadata"]
        assert md["pcp-stack"] == any_run.stack
        assert md["pcp-bucket"] == any_run.outputs["bucket"]
        assert md["pcp-project"] == any_run.config["gcp:project"]
        assert md["pcp-node"] == f"worker-{i}"
        # Code deploys must not touch VM metadata: the code is found through the pointer.
        assert not any(k.startswith("pcp-source") for k in md)
        # Set at run time by the control plane only.
        assert "pcp-assignment" not in md
        # Optional bootstrap keys: present exactly when configured.
        for key in ("cachix_cache", "cachix_public_key", "nix_installer_url"):
            value = any_run.config[f"pcp:{key}"]
            meta = "pcp-" + key.replace("_", "-")
            assert md.get(meta) == (value or None), meta
        # Every stack has GPUs: the agent checks this many with nvidia-smi before a run.
        gpus = int(any_run.config.get("pcp:gpu_count") or 0)
        assert md["pcp-gpu-count"] == str(gpus or 1)
        assert md["install-nvidia-driver"] == "True"
        # In metadata (in-place update), not metadata_startup_script (forces a new VM).
        assert "metadataStartupScript" not in vm["inputs"]
        if "worker-startup.sh" in any_run.data["placeholders"]:
            assert md["startup-script"].startswith("#!")
        else:
            assert md["startup-script"] == startup.read_text(encoding="utf-8")


def test_worker_ignore_changes_cover_run_time_fields(any_run):
    from pcp_infra.fleet import WORKER_IGNORE_CHANGES

    required = {
        'metadata["pcp-assignment"]',
        "labels",
        "scheduling.maxRunDuration",
        "scheduling.instanceTerminationAction",
        "desiredStatus",
        "currentStatus",
    }
    assert required <= set(WORKER_IGNORE_CHANGES)
    for vm in any_run.of_type(INSTANCE):
        # Captured from the RegisterResource request the engine would receive.
        ignored = set(vm["ignoreChanges"])
        assert required <= ignored
        assert ignored == set(WORKER_IGNORE_CHANGES)
        # Nested paths are not translated by the SDK: they must already be camelCase.
        for path in ignored:
            assert "_" not in path.split("[")[0], path


def test_functions_sa_controls_exactly_the_workers(any_run):
    grants = any_run.of_type(INSTANCE_MEMBER)
    vm_names = {vm["inputs"]["name"] for vm in any_run.of_type(INSTANCE)}
    assert {g["inputs"]["instanceName"] for g in grants} == vm_names
    role = f"projects/{any_run.config['gcp:project']}/roles/pcp_{any_run.stack}_fleet_control"
    for g in grants:
        assert g["inputs"]["role"] == role
        assert g["inputs"]["member"] == any_run.sa_member("functions")
        assert g["inputs"]["zone"] == any_run.config["pcp:zone"]


def test_custom_roles_are_narrow(any_run):
    roles = {r["inputs"]["roleId"]: r["inputs"] for r in any_run.of_type(CUSTOM_ROLE)}
    control = roles[f"pcp_{any_run.stack}_fleet_control"]["permissions"]
    observe = roles[f"pcp_{any_run.stack}_fleet_observe"]["permissions"]
    assert set(control) == {
        "compute.instances.get",
        "compute.instances.start",
        "compute.instances.stop",
        "compute.instances.setMetadata",
        "compute.instances.setLabels",
        "compute.instances.setScheduling",
    }
    assert set(observe) == {"compute.instances.list", "compute.zoneOperations.get"}
    (observe_grant,) = [
        m for m in any_run.of_type(PROJECT_MEMBER) if m["inputs"]["role"].endswith("fleet_observe")
    ]
    assert observe_grant["inputs"]["member"] == any_run.sa_member("functions")


# --------------------------------------------------------------------------- functions


def test_functions_shape(any_run):
    fns = {f["inputs"]["name"]: f["inputs"] for f in any_run.of_type(FUNCTION)}
    assert set(fns) == {f"{any_run.prefix}-{kind}" for kind in functions_of(any_run)}
    assert any_run.outputs["functions"] == {k: f"{any_run.prefix}-{k}"
                                            for k in functions_of(any_run)}
    source = any_run.one(BUCKET_OBJECT, f"{any_run.prefix}-functions-source")
    sha = any_run.outputs["function_source_sha256"]
    assert sha in source["inputs"]["name"] and len(sha) == 64
    assert source["inputs"]["source"]["__asset__"] == "FileAsset"
    assert source["inputs"]["bucket"] == any_run.outputs["bucket"]

    for kind, (entry, topic, timeout) in functions_of(any_run).items():
        fn = fns[f"{any_run.prefix}-{kind}"]
        assert fn["location"] == any_run.config["pcp:region"]
        build = fn["buildConfig"]
        assert build["runtime"] == "python311"
        assert build["entryPoint"] == entry
        assert build["source"]["storageSource"] == {
            "bucket": any_run.outputs["bucket"],
            "object": source["inputs"]["name"],
        }
        trigger = fn["eventTrigger"]
        assert trigger["eventType"] == "google.cloud.pubsub.topic.v1.messagePublished"
        assert trigger["pubsubTopic"] == topic_id(any_run, topic)
        assert trigger["retryPolicy"] == "RETRY_POLICY_RETRY"
        assert trigger["serviceAccountEmail"] == any_run.sa_email("functions")
        svc = fn["serviceConfig"]
        assert svc["serviceAccountEmail"] == any_run.sa_email("functions")
        assert svc["timeoutSeconds"] == float(timeout)
        assert svc["availableMemory"] == "512M"
        assert 1 <= svc["maxInstanceCount"] <= 20


def test_functions_environment(any_run):
    cfg = any_run.config
    expected = {
        "PCP_STACK": any_run.stack,
        "PCP_PROJECT": cfg["gcp:project"],
        "PCP_ZONE": cfg["pcp:zone"],
        "PCP_BUCKET": any_run.outputs["bucket"],
        "PCP_WORKER_COUNT": str(any_run.expected_workers),
        "PCP_SHEPHERD_HOST": cfg["pcp:shepherd_host"],
        "PCP_TCP_PORT": cfg["pcp:tcp_port"],
        "PCP_MAX_RUN_HOURS": cfg["pcp:max_run_hours"],
        "PCP_BOOT_TIMEOUT_MINUTES": cfg["pcp:boot_timeout_minutes"],
        "PCP_KEEP_ALIVE_HOURS": cfg["pcp:keep_alive_hours"],
        "PCP_SWEEP_INTERVAL_MINUTES": cfg["pcp:sweep_interval_minutes"],
        "PCP_BINARY": cfg["pcp:binary"],
        "PCP_LAYOUT": cfg.get("pcp:layout", "all-nodes"),
        "PCP_IMAGE": cfg.get("pcp:image", ""),
        "PCP_WANDB_PROJECT": cfg.get("pcp:wandb_project", ""),
        "PCP_WANDB_ENTITY": cfg.get("pcp:wandb_entity", ""),
        "PCP_WORKER_HOURLY_USD": cfg["pcp:worker_hourly_usd"],
        "PCP_SHEPHERD_HOURLY_USD": cfg["pcp:shepherd_hourly_usd"],
        # not a stack setting: the policy's default, written so the contract is complete
        "PCP_FIRST_BOOT_GRACE_MINUTES": "30",
    }
    assert set(expected) | {"PCP_FUNCTION_TIMEOUT_SECONDS"} == PCP_ENV
    if cfg.get("pcp:billing_account"):  # the budget variant: its settings ride along
        budget = any_run.of_type("gcp:billing/budget:Budget")[0]
        expected |= {"PCP_BILLING_ACCOUNT": cfg["pcp:billing_account"],
                     # the id part of the name the mocks give it (billingAccounts/A/budgets/ID)
                     "PCP_BUDGET_ID": f"b{zlib.crc32(budget['name'].encode())}",
                     "PCP_BUDGET_STOP_THRESHOLD": cfg["pcp:budget_stop_threshold"],
                     "PCP_MAX_COST_USD": cfg["pcp:max_cost_usd"]}
    for fn in any_run.of_type(FUNCTION):
        svc = fn["inputs"]["serviceConfig"]
        env = svc["environmentVariables"]
        # Each function is told its own timeout, exactly the one the platform enforces.
        assert env == {**expected, "PCP_FUNCTION_TIMEOUT_SECONDS": str(int(svc["timeoutSeconds"]))}
        assert all(isinstance(v, str) for v in env.values())


def test_functions_that_stop_vms_outlast_a_gce_stop(any_run):
    """A stop may take 120 s of guest soft-off plus the calls around it: every function (each
    may stop VMs) gets the event-driven maximum, and no more (GCP refuses more)."""
    for fn in any_run.of_type(FUNCTION):
        assert fn["inputs"]["serviceConfig"]["timeoutSeconds"] == float(EVENT_MAX)


def test_trigger_identity_may_invoke_and_receive(any_run):
    invokers = any_run.of_type(RUN_MEMBER)
    assert {i["inputs"]["name"] for i in invokers} == {f"{any_run.prefix}-{k}"
                                                         for k in functions_of(any_run)}
    for i in invokers:
        assert i["inputs"]["role"] == "roles/run.invoker"
        assert i["inputs"]["member"] == any_run.sa_member("functions")
        assert i["inputs"]["location"] == any_run.config["pcp:region"]
    receivers = any_run.by_input(PROJECT_MEMBER, "role", "roles/eventarc.eventReceiver")
    assert [r["inputs"]["member"] for r in receivers] == [any_run.sa_member("functions")]
    # Functions are created after their trigger identity can receive events.
    receiver_urn = receivers[0]["urn"]
    for fn in any_run.of_type(FUNCTION):
        assert receiver_urn in fn["dependencies"]


def test_service_agents_exist_and_are_granted_before_the_triggers(any_run):
    """The first `up` must not race Eventarc's and Pub/Sub's lazily created service agents."""
    agents = {a["inputs"]["service"]: a for a in any_run.of_type(SERVICE_IDENTITY)}
    assert set(agents) == {"eventarc.googleapis.com", "pubsub.googleapis.com"}
    for agent in agents.values():
        assert agent["inputs"]["project"] == any_run.config["gcp:project"]
    eventarc_member = "serviceAccount:service-123456789012" + AGENT_SUFFIX["eventarc"]
    pubsub_member = "serviceAccount:service-123456789012" + AGENT_SUFFIX["pubsub"]
    (eventarc_grant,) = [g for g in any_run.of_type(PROJECT_MEMBER)
                         if g["inputs"]["member"] == eventarc_member]
    assert eventarc_grant["inputs"]["role"] == "roles/eventarc.serviceAgent"
    # One binding for the whole project, declared by every stack: a `pulumi destroy` of one
    # stack must leave it to the others.
    assert eventarc_grant["retainOnDelete"] is True
    assert not any(r["retainOnDelete"] for r in any_run.custom if r is not eventarc_grant)
    assert agents["eventarc.googleapis.com"]["urn"] in eventarc_grant["dependencies"]
    # Push deliveries carry the trigger identity's OIDC token, minted by the Pub/Sub agent:
    # token creator on that one account, not on the project.
    (token_grant,) = [g for g in any_run.of_type(SA_MEMBER)
                      if g["inputs"]["member"] == pubsub_member]
    assert token_grant["inputs"]["role"] == "roles/iam.serviceAccountTokenCreator"
    assert token_grant["inputs"]["serviceAccountId"].endswith(
        "/serviceAccounts/" + any_run.sa_email("functions"))
    assert not [g for g in any_run.of_type(PROJECT_MEMBER)
                if g["inputs"]["member"] == pubsub_member]
    assert agents["pubsub.googleapis.com"]["urn"] in token_grant["dependencies"]
    must_precede = {a["urn"] for a in agents.values()} | {eventarc_grant["urn"], token_grant["urn"]}
    for fn in any_run.of_type(FUNCTION):  # each function creates its Eventarc trigger
        assert must_precede <= set(fn["dependencies"]), fn["name"]
    # The Pub/Sub agent's dead-letter grants name the created agent and wait for it.
    agent_grants = [g for g in [*any_run.of_type(TOPIC_MEMBER), *any_run.of_type(SUB_MEMBER)]
                    if g["inputs"]["member"] == pubsub_member]
    assert len(agent_grants) == 2
    for g in agent_grants:
        assert agents["pubsub.googleapis.com"]["urn"] in g["dependencies"]


def test_functions_built_by_dedicated_build_sa(any_run):
    build_sa = any_run.sa_email("build")
    for fn in any_run.of_type(FUNCTION):
        assert fn["inputs"]["buildConfig"]["serviceAccount"].endswith(
            f"/serviceAccounts/{build_sa}"
        )
    roles = {
        m["inputs"]["role"]
        for m in any_run.of_type(PROJECT_MEMBER)
        if m["inputs"]["member"] == any_run.sa_member("build")
    }
    assert "roles/cloudbuild.builds.builder" in roles


def test_agent_sdist_for_the_workers(any_run):
    agent = any_run.one(BUCKET_OBJECT, f"{any_run.prefix}-agent-sdist")
    a = agent["inputs"]
    # The fixed name bootstrap/worker-startup.sh installs from.
    assert a["name"] == "agent/pcp-agent.tar.gz"
    startup = INFRA / "bootstrap" / "worker-startup.sh"
    if startup.is_file():
        assert "agent%2Fpcp-agent.tar.gz" in startup.read_text()
    assert a["bucket"] == any_run.outputs["bucket"]
    assert a["source"]["__asset__"] == "FileAsset"
    assert a["metadata"] == {"pcp-sha256": any_run.outputs["agent_sha256"]}
    assert any_run.outputs["agent_archive"] == f"gs://{any_run.outputs['bucket']}/{a['name']}"
    # Same name, new content: the old object must go first, or its deletion removes the upload.
    assert agent["deleteBeforeReplace"] is True
    # Nothing may depend on a delete-first resource (dependents could be replaced with it):
    # above all not the VMs, whose disks hold the Nix store.
    assert not any(agent["urn"] in r["dependencies"] for r in any_run.resources)
    # Lifecycle rules never expire the code.
    (bucket,) = any_run.of_type(BUCKET)
    for rule in bucket["inputs"]["lifecycleRules"]:
        for prefix in rule["condition"]["matchesPrefixes"]:
            assert not a["name"].startswith(prefix)
            assert not any_run.outputs["function_source"].split("/", 3)[3].startswith(prefix)


# --------------------------------------------------------------------------- bucket + events


def test_bucket(any_run):
    (bucket,) = any_run.of_type(BUCKET)
    b = bucket["inputs"]
    assert b["name"] == f"{any_run.prefix}-{any_run.config['gcp:project']}"
    assert any_run.outputs["bucket"] == b["name"]
    assert b["uniformBucketLevelAccess"] is True
    assert b["publicAccessPrevention"] == "enforced"
    assert b["forceDestroy"] is False
    assert b.get("versioning", {}).get("enabled", False) is False
    assert b["location"] == any_run.config["pcp:bucket_location"]
    # Soft delete off, deliberately (infra/README.md): 0 disables it; leaving it out would
    # keep GCS's 7-day default and bill every overwritten checkpoint for a week.
    assert b["softDeletePolicy"] == {"retentionDurationSeconds": 0.0}


def test_bucket_lifecycle(any_run):
    (bucket,) = any_run.of_type(BUCKET)
    rules = bucket["inputs"]["lifecycleRules"]
    retention = float(any_run.config["pcp:results_retention_days"])
    ages: dict[str, float] = {}
    for rule in rules:
        assert rule["action"]["type"] == "Delete"
        cond = rule["condition"]
        # Every delete rule is scoped by prefix: none may reach control/stack.json.
        assert cond.get("matchesPrefixes"), "a lifecycle rule without prefix would hit control/"
        assert set(cond) == {"age", "matchesPrefixes"}, cond
        for prefix in cond["matchesPrefixes"]:
            assert prefix not in ages, f"{prefix} in two rules"
            ages[prefix] = cond["age"]
    assert ages == {"runs/": retention, "markers/": retention, "control/sweeps/": 30.0}
    # Of control/, only the sweep audit expires: the stack document never matches.
    for prefix in ages:
        assert not "control/stack.json".startswith(prefix)
        assert not "control/rejected/x.json".startswith(prefix)
        if prefix.startswith("control/"):
            assert prefix == "control/sweeps/"


def test_sweep_audit_documents_fall_under_their_rule(any_run):
    """The objects the sweeper writes (pcp.core.names.sweep_doc) are the ones that expire."""
    from pcp.core.names import STACK_DOC, sweep_doc

    (bucket,) = any_run.of_type(BUCKET)
    prefixes = [p for r in bucket["inputs"]["lifecycleRules"]
                for p in r["condition"]["matchesPrefixes"]]
    assert any(sweep_doc("20260101T000000Z").startswith(p) for p in prefixes)
    assert not any(STACK_DOC.startswith(p) for p in prefixes)


def test_markers_notification(any_run):
    (note,) = any_run.of_type(NOTIFICATION)
    n = note["inputs"]
    assert n["bucket"] == any_run.outputs["bucket"]
    assert n["topic"] == topic_id(any_run, "markers")
    assert n["payloadFormat"] == "JSON_API_V1"
    assert n["eventTypes"] == ["OBJECT_FINALIZE"]
    assert n["objectNamePrefix"] == "markers/"
    # The GCS service agent (from the invoke) may publish to the markers topic, and that grant
    # exists before the notification.
    (agent_call,) = [
        c for c in any_run.data["invokes"] if c["token"].endswith("getProjectServiceAccount")
    ]
    assert agent_call["args"]["project"] == any_run.config["gcp:project"]
    grants = [
        g
        for g in any_run.of_type(TOPIC_MEMBER)
        if g["inputs"]["topic"] == f"{any_run.prefix}-markers"
    ]
    assert len(grants) == 1
    grant = grants[0]["inputs"]
    assert grant["role"] == "roles/pubsub.publisher"
    assert grant["member"].startswith("serviceAccount:service-")
    assert grant["member"].endswith("@gs-project-accounts.iam.gserviceaccount.com")
    assert grants[0]["urn"] in note["dependencies"]


def test_topics_and_shepherd_subscription(any_run):
    topics = {t["inputs"]["name"] for t in any_run.of_type(TOPIC)}
    kinds = ["start", "stop", "sweep", "shepherd", "markers", "dead-letter"]
    if any_run.config.get("pcp:billing_account"):
        kinds.append("budget")
    assert topics == {f"{any_run.prefix}-{k}" for k in kinds}
    assert any_run.outputs["topics"] == {
        k.replace("-", "_"): f"{any_run.prefix}-{k}" for k in kinds
    }
    sub = any_run.one(SUBSCRIPTION, f"{any_run.prefix}-sub-shepherd-host")["inputs"]
    assert sub["name"] == f"{any_run.prefix}-shepherd-host"
    assert any_run.outputs["shepherd_subscription"] == sub["name"]
    assert sub["topic"] == topic_id(any_run, "shepherd")
    assert sub["ackDeadlineSeconds"] == 60.0
    assert sub["expirationPolicy"] == {"ttl": ""}
    assert not sub.get("filter")
    assert not sub.get("pushConfig")
    assert sub["deadLetterPolicy"]["deadLetterTopic"] == topic_id(any_run, "dead-letter")
    assert 5 <= sub["deadLetterPolicy"]["maxDeliveryAttempts"] <= 100
    # Dead-lettering works only if the Pub/Sub service agent may publish to the DLQ and
    # acknowledge on the source subscription.
    agent = "serviceAccount:service-123456789012@gcp-sa-pubsub.iam.gserviceaccount.com"
    assert any(
        g["inputs"]["topic"] == f"{any_run.prefix}-dead-letter" and g["inputs"]["member"] == agent
        for g in any_run.of_type(TOPIC_MEMBER)
    )
    assert any(
        g["inputs"]["subscription"] == sub["name"] and g["inputs"]["member"] == agent
        for g in any_run.of_type(SUB_MEMBER)
    )
    # The dead-letter topic has a subscription, so dead letters are kept, not dropped.
    held = [
        s for s in any_run.of_type(SUBSCRIPTION) if s["inputs"]["topic"].endswith("-dead-letter")
    ]
    assert len(held) == 1


def test_scheduler_job(any_run):
    (job,) = any_run.of_type(JOB)
    j = job["inputs"]
    assert j["name"] == f"{any_run.prefix}-sweep"
    assert j["region"] == any_run.config["pcp:region"]
    assert j["schedule"] == f"*/{any_run.config['pcp:sweep_interval_minutes']} * * * *"
    assert j["timeZone"] == "Etc/UTC"
    target = j["pubsubTarget"]
    assert target["topicName"] == topic_id(any_run, "sweep")
    assert json.loads(base64.b64decode(target["data"])) == {"op": "tick"}
    assert "attemptDeadline" not in j  # ignored for Pub/Sub targets: a perpetual diff


# --------------------------------------------------------------------------- IAM + network


def test_no_primitive_roles_anywhere(any_run):
    for r in any_run.custom:
        role = r["inputs"].get("role")
        if role is not None:
            assert role not in PRIMITIVE_ROLES, f"{r['name']} grants {role}"
        for value in iter_strings(r["inputs"]):
            assert value not in PRIMITIVE_ROLES, f"{r['name']} mentions {value}"
    for role in any_run.of_type(CUSTOM_ROLE):
        assert all("*" not in p for p in role["inputs"]["permissions"])


def test_grants_per_service_account(any_run):
    def grants_of(role: str) -> set[tuple[str, str, str]]:
        member = any_run.sa_member(role)
        found = set()
        for r in any_run.custom:
            i = r["inputs"]
            if i.get("member") != member:
                continue
            target = (
                i.get("bucket")
                or i.get("topic")
                or i.get("subscription")
                or i.get("instanceName")
                or i.get("serviceAccountId")
                or i.get("repository")
                or i.get("secretId")
                or (i.get("name") if r["type"] == RUN_MEMBER else None)
                or "project"
            )
            found.add((r["type"].split(":")[-1], target, i["role"]))
        return found

    p = any_run.prefix
    bucket = any_run.outputs["bucket"]
    assert grants_of("dispatch") == {
        ("TopicIAMMember", f"{p}-start", "roles/pubsub.publisher"),
        ("TopicIAMMember", f"{p}-stop", "roles/pubsub.publisher"),
        ("BucketIAMMember", bucket, "roles/storage.objectViewer"),
        # `pcp doctor` in the train workflow: topics exist, the sweep job is enabled.
        ("TopicIAMMember", f"{p}-start", "roles/pubsub.viewer"),
        ("TopicIAMMember", f"{p}-stop", "roles/pubsub.viewer"),
        ("TopicIAMMember", f"{p}-sweep", "roles/pubsub.viewer"),
        ("TopicIAMMember", f"{p}-shepherd", "roles/pubsub.viewer"),
        ("IAMMember", "project", "roles/cloudscheduler.viewer"),
    }
    wandb_key = ("SecretIamMember", f"{p}-wandb-api-key", "roles/secretmanager.secretAccessor")
    assert grants_of("shepherd") == {
        ("SubscriptionIAMMember", f"{p}-shepherd-host", "roles/pubsub.subscriber"),
        ("BucketIAMMember", bucket, "roles/storage.objectAdmin"),
        ("RepositoryIamMember", p, "roles/artifactregistry.reader"),
        wandb_key,
    }
    assert grants_of("worker") == {
        ("BucketIAMMember", bucket, "roles/storage.objectAdmin"),
        ("IAMMember", "project", "roles/logging.logWriter"),
        # pulls the run's image (docs/trainers.md)
        ("RepositoryIamMember", p, "roles/artifactregistry.reader"),
        wandb_key,
    }
    functions = grants_of("functions")
    worker_sa = (
        f"projects/{any_run.config['gcp:project']}/serviceAccounts/{any_run.sa_email('worker')}"
    )
    for expected in [
        ("BucketIAMMember", bucket, "roles/storage.objectAdmin"),
        ("TopicIAMMember", f"{p}-shepherd", "roles/pubsub.publisher"),
        ("TopicIAMMember", f"{p}-stop", "roles/pubsub.publisher"),
        ("IAMMember", worker_sa, "roles/iam.serviceAccountUser"),
        ("IAMMember", "project", "roles/eventarc.eventReceiver"),
        ("RepositoryIamMember", p, "roles/artifactregistry.reader"),  # pins tags to digests
    ]:
        assert expected in functions
    # No predefined project-wide compute role: only the custom fleet roles.
    assert not any(role.startswith("roles/compute.") for _, _, role in functions)
    deploy_roles = {role for _, _, role in grants_of("deploy")}
    assert {"roles/compute.admin", "roles/cloudfunctions.admin", "roles/iam.roleAdmin"} <= (
        deploy_roles
    )


def test_workload_identity_federation(any_run):
    repo = any_run.config["pcp:github_repository"]
    (pool,) = any_run.of_type(POOL)
    pool_id = pool["inputs"]["workloadIdentityPoolId"]
    assert pool_id == f"{any_run.prefix}-github" and 4 <= len(pool_id) <= 32
    (provider,) = any_run.of_type(POOL_PROVIDER)
    pi = provider["inputs"]
    assert pi["workloadIdentityPoolProviderId"] == "github"
    # Only the train workflow of this repository, in this stack's environment (whose
    # required reviewers and branch rules are the protection); see test_wif_condition_*.
    assert pi["attributeCondition"] == (
        f'assertion.repository == "{repo}"'
        f' && assertion.environment == "training-{any_run.stack}"'
        f' && assertion.workflow_ref.startsWith("{repo}/.github/workflows/train.yml@")'
    )
    assert pi["attributeMapping"]["attribute.environment"] == "assertion.environment"
    assert pi["attributeMapping"]["google.subject"] == "assertion.sub"
    assert pi["attributeMapping"]["attribute.repository"] == "assertion.repository"
    assert pi["oidc"]["issuerUri"] == "https://token.actions.githubusercontent.com"
    assert any_run.outputs["workload_identity_provider"].endswith(
        f"/workloadIdentityPools/{pool_id}/providers/github"
    )
    wif_users = any_run.by_input(SA_MEMBER, "role", "roles/iam.workloadIdentityUser")
    assert {u["inputs"]["serviceAccountId"].rsplit("/", 1)[1] for u in wif_users} == {
        any_run.sa_email("deploy"),
        any_run.sa_email("dispatch"),
    }
    for u in wif_users:
        assert u["inputs"]["member"].startswith("principalSet://iam.googleapis.com/projects/")
        assert u["inputs"]["member"].endswith(
            f"/workloadIdentityPools/{pool_id}/attribute.repository/{repo}"
        )
    assert any_run.outputs["dispatch_service_account"] == any_run.sa_email("dispatch")


def _cel_condition_holds(condition: str, claims: dict[str, str]) -> bool:
    """Evaluate the provider's condition on a token's claims: the condition is a conjunction of
    `assertion.X == "v"` and `assertion.X.startsWith("v")` terms (anything else fails), and a
    missing claim makes it false, as an error does in Google's CEL evaluation."""
    import re

    terms = condition.split(" && ")
    for term in terms:
        eq = re.fullmatch(r'assertion\.(\w+) == "([^"]*)"', term)
        sw = re.fullmatch(r'assertion\.(\w+)\.startsWith\("([^"]*)"\)', term)
        if eq:
            if claims.get(eq[1]) != eq[2]:
                return False
        elif sw:
            if sw[1] not in claims or not claims[sw[1]].startswith(sw[2]):
                return False
        else:
            raise AssertionError(f"unexpected term {term!r}")
    return True


def test_wif_condition_admits_only_the_train_workflow_in_its_environment(stack_run):
    repo = stack_run.config["pcp:github_repository"]
    (provider,) = stack_run.of_type(POOL_PROVIDER)
    condition = provider["inputs"]["attributeCondition"]
    good = {
        "repository": repo,
        "environment": f"training-{stack_run.stack}",
        "workflow_ref": f"{repo}/.github/workflows/train.yml@refs/heads/main",
        "sub": f"repo:{repo}:environment:training-{stack_run.stack}",
    }
    assert _cel_condition_holds(condition, good)
    # A tag push (train/*) runs the same workflow at another ref: admitted.
    tag = {**good, "workflow_ref": f"{repo}/.github/workflows/train.yml@refs/tags/train/x"}
    assert _cel_condition_holds(condition, tag)
    other = "tiny" if stack_run.stack != "tiny" else "small"
    refused = {
        "another repository": {**good, "repository": "someone/else"},
        "no environment": {k: v for k, v in good.items() if k != "environment"},
        "another stack's environment": {**good, "environment": f"training-{other}"},
        "a plain environment": {**good, "environment": "training"},
        "another workflow": {**good,
                             "workflow_ref": f"{repo}/.github/workflows/ci.yml@refs/heads/main"},
        "a look-alike file": {**good,
                              "workflow_ref": f"{repo}/.github/workflows/train.yml.evil@refs/x"},
        "a fork's workflow": {**good, "workflow_ref": f"fork/{repo}/.github/workflows/train.yml@x"},
    }
    for why, claims in refused.items():
        assert not _cel_condition_holds(condition, claims), why


def test_wif_condition_refuses_a_value_that_would_break_its_quoting():
    from pcp_infra.identity import github_attribute_condition

    assert "owner/repo" in github_attribute_condition("owner/repo", "training-tiny")
    for bad in ('owner/re"po', "owner/re\\po"):
        with pytest.raises(ValueError):
            github_attribute_condition(bad, "training-tiny")


def test_firewall_never_open_to_the_internet(any_run):
    tag = f"{any_run.prefix}-worker"
    rules = {f["inputs"]["name"]: f["inputs"] for f in any_run.of_type(FIREWALL)}
    for name, rule in rules.items():
        assert rule.get("direction", "INGRESS") == "INGRESS", name
        assert rule["targetTags"] == [tag], name
        for cidr in rule.get("sourceRanges", []):
            assert ipaddress.ip_network(cidr).prefixlen > 0, f"{name} admits {cidr}"
        assert rule.get("sourceRanges") or rule.get("sourceTags"), name
    internal = rules[f"{any_run.prefix}-worker-internal"]
    # Every TCP port between the workers (gloo and NCCL listen on ephemeral ports, the store
    # on any free one), from the stack's subnet and its worker tag only.
    assert internal["sourceTags"] == [tag] and internal["sourceRanges"] == [WORKER_SUBNET_CIDR]
    tcp = [a for a in internal["allows"] if a["protocol"] == "tcp"]
    assert tcp == [{"protocol": "tcp"}], "no `ports`: every TCP port"
    subnets = any_run.of_type("gcp:compute/subnetwork:Subnetwork")
    assert [sn["inputs"]["ipCidrRange"] for sn in subnets] == [WORKER_SUBNET_CIDR]
    ssh = rules[f"{any_run.prefix}-worker-ssh"]
    assert ssh["sourceRanges"] == ["35.235.240.0/20"]
    assert ssh["allows"] == [{"protocol": "tcp", "ports": ["22"]}]
    # 22 is open from outside the stack through IAP only.
    for name, rule in rules.items():
        if name not in (f"{any_run.prefix}-worker-ssh", f"{any_run.prefix}-worker-internal"):
            for a in rule["allows"]:
                assert "22" not in a.get("ports", []), name


def test_shepherd_ingress_only_when_configured(stack_run, variant):
    assert len(stack_run.of_type(FIREWALL)) == 2
    rules = {f["inputs"]["name"]: f["inputs"] for f in variant.of_type(FIREWALL)}
    shepherd = rules["pcp-tiny-worker-from-shepherd"]
    assert shepherd["sourceRanges"] == ["203.0.113.7/32"]
    assert shepherd["allows"] == [{"protocol": "tcp", "ports": ["9000-9100", "29500"]}]


# --------------------------------------------------------------------------- structure


def test_apis_enabled_and_awaited(any_run):
    services = any_run.of_type(SERVICE)
    names = {s["inputs"]["service"] for s in services}
    for api in ["compute", "cloudfunctions", "run", "eventarc", "pubsub", "storage",
                "cloudscheduler", "cloudbuild", "artifactregistry", "iam", "iamcredentials",
                "sts", "cloudresourcemanager"]:  # fmt: skip
        assert f"{api}.googleapis.com" in names
    for s in services:
        assert s["inputs"]["disableOnDestroy"] is False
    service_urns = {s["urn"] for s in services}
    for r in any_run.custom:
        if r["type"] != SERVICE:
            missing = service_urns - set(r["dependencies"])
            assert not missing, f"{r['name']} does not wait for the APIs"


def test_every_resource_lives_in_a_component(any_run):
    components = {r["urn"]: r for r in any_run.resources if not r["custom"]}
    assert {c["type"] for c in components.values()} == {
        "pcp:infra:ProjectApis", "pcp:infra:ServiceAccounts", "pcp:infra:GithubFederation",
        "pcp:infra:StateBucket", "pcp:infra:Messaging", "pcp:infra:WorkerNetwork",
        "pcp:infra:WorkerFleet", "pcp:infra:ControlFunctions", "pcp:infra:SweepSchedule",
        "pcp:infra:CodeArchives", "pcp:infra:ServiceAgents", "pcp:infra:LogMetrics",
        "pcp:infra:Alerts", "pcp:infra:StackDashboard", "pcp:infra:ImageRepository",
        "pcp:infra:WandbSecret",
    } | ({"pcp:infra:StackBudget"}
         if any_run.config.get("pcp:billing_account") else set())  # fmt: skip
    for r in any_run.custom:
        parent_type = r["parent"].split("::")[-2].split("$")[-1]
        assert parent_type.startswith("pcp:infra:"), r["name"]
    registered = set(any_run.data["outputs_registered"])
    for urn in components:
        assert urn in registered, f"{urn} did not call register_outputs"


def test_names_are_stack_prefixed(any_run):
    prefix = any_run.prefix + "-"
    for r in any_run.custom:
        assert r["name"].startswith(prefix), r["name"]
        name = r["inputs"].get("name")
        if r["type"] in (TOPIC, SUBSCRIPTION, INSTANCE, FUNCTION, JOB, FIREWALL, BUCKET):
            assert name.startswith(prefix), name
    for sa in any_run.outputs["service_accounts"].values():
        assert sa.startswith(prefix)


def test_stack_outputs(any_run):
    out = any_run.outputs
    for key in ["vm_names", "bucket", "topics", "shepherd_subscription", "functions",
                "service_accounts", "workload_identity_provider", "dispatch_service_account",
                "project", "zone", "stack"]:  # fmt: skip
        assert key in out, key
    assert out["stack"] == any_run.stack
    assert out["project"] == any_run.config["gcp:project"]
    assert out["zone"] == any_run.config["pcp:zone"]
    assert set(out["service_accounts"]) >= {"worker", "functions", "shepherd", "dispatch", "deploy"}


# --------------------------------------------------------------------------- config


def test_program_reads_only_declared_keys(any_run):
    project = yaml.safe_load((INFRA / "Pulumi.yaml").read_text())
    declared = {f"pcp:{k}" for k in project["config"]}
    read = {k for k in any_run.data["config_keys_read"] if k.startswith("pcp:")}
    assert read <= declared, f"read but not declared: {sorted(read - declared)}"
    assert declared <= read, f"declared but never read: {sorted(declared - read)}"
    others = {k for k in any_run.data["config_keys_read"] if not k.startswith("pcp:")}
    assert others == {"gcp:project"}


# --------------------------------------------------------------------------- quotas (README)


def _quota_needs(run) -> dict[str, int]:
    """What one stack's workers take of each Compute Engine quota, from the declared VMs."""
    needs = dict.fromkeys(["NVIDIA_T4_GPUS", "NVIDIA_L4_GPUS", "GPUS_ALL_REGIONS", "CPUS",
                           "CPUS_ALL_REGIONS", "SSD_TOTAL_GB", "IN_USE_ADDRESSES"], 0)
    gpu_metric = {"nvidia-tesla-t4": "NVIDIA_T4_GPUS", "nvidia-l4": "NVIDIA_L4_GPUS"}
    for vm in run.of_type(INSTANCE):
        i = vm["inputs"]
        vcpus = int(i["machineType"].rsplit("-", 1)[1])  # n1-standard-4, g2-standard-8
        needs["CPUS"] += vcpus
        needs["CPUS_ALL_REGIONS"] += vcpus
        attached = i.get("guestAccelerators") or []
        gpus = (sum(int(a["count"]) for a in attached) if attached
                else int(run.config["pcp:gpu_count"]))  # built into g2
        needs[gpu_metric[run.config["pcp:gpu_type"]]] += gpus
        needs["GPUS_ALL_REGIONS"] += gpus
        disk = i["bootDisk"]["initializeParams"]
        assert disk["type"] == "pd-balanced"  # an SSD type: SSD_TOTAL_GB
        needs["SSD_TOTAL_GB"] += int(disk["size"])
        needs["IN_USE_ADDRESSES"] += len(i["networkInterfaces"][0].get("accessConfigs") or [])
    return needs


def test_readme_quota_table_matches_the_stacks(mock_runs):
    import re

    readme = (INFRA / "README.md").read_text()
    rows = {m[1]: [int(x) for x in m.groups()[1:]] for m in re.finditer(
        r"^\| `([A-Z0-9_]+)` \| \w+ \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|",
        readme, re.M)}
    stacks = ["tiny", "small", "large", "huge"]
    computed = {stack: _quota_needs(mock_runs[stack]) for stack in stacks}
    assert set(rows) == set(computed["tiny"])
    for metric, (*per_stack, total) in rows.items():
        assert per_stack == [computed[s][metric] for s in stacks], metric
        assert total == sum(per_stack), metric


def test_the_stack_has_an_image_repository_its_nodes_and_functions_read(any_run):
    """One docker repository per stack, in the stack's region; the workers (and the shepherd
    and the functions, which pin tags) are its readers, and nobody is granted more here."""
    (repo,) = any_run.of_type(REPOSITORY)
    r = repo["inputs"]
    assert r["repositoryId"] == any_run.prefix
    assert r["format"] == "DOCKER"
    assert r["location"] == any_run.config.get("pcp:region", "us-central1")
    assert r["project"] == any_run.config["gcp:project"]
    members = {m["inputs"]["member"]: m["inputs"] for m in any_run.of_type(REPOSITORY_MEMBER)}
    assert set(members) == {f"serviceAccount:{any_run.sa_email(a)}"
                            for a in ("worker", "shepherd", "functions")}
    for m in members.values():
        assert m["role"] == "roles/artifactregistry.reader"
        assert m["repository"] == any_run.prefix
        assert m["location"] == r["location"]
    assert any_run.outputs["image_repository"] == (
        f"{r['location']}-docker.pkg.dev/{r['project']}/{any_run.prefix}")
