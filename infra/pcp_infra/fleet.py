"""Persistent GPU worker VMs: created once, then started and stopped by the control plane.

Pulumi owns the VM's shape; the control plane owns its run-time state. The fields the control
plane changes (docs/architecture.md: status, the `pcp-assignment` metadata key, run labels, the
GCE hard cap `scheduling.maxRunDuration` + `instanceTerminationAction`) are in
WORKER_IGNORE_CHANGES, and `desired_status` is never set, so `pulumi up` (even after a
refresh) never starts or stops a worker or undoes an armed hard cap.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import (
    ASSIGNMENT_KEY,
    LABEL_NODE,
    LABEL_ROLE,
    META_BUCKET,
    META_NODE,
    META_PROJECT,
    META_STACK,
    Names,
    worker_node,
)

from . import paths
from .base import PcpComponent
from .config import StackConfig
from .identity import ServiceAccounts
from .network import WorkerNetwork
from .storage import StateBucket

#: Fields changed at run time, never reverted by `pulumi up`. Top-level names are given in
#: their wire (camelCase) form; nested paths are not translated by the SDK, so they must be.
#: Only the run-time metadata key is ignored (not all of "metadata"), so that a changed startup
#: script still reaches the VMs in place; note that when Pulumi does update the metadata it
#: writes the whole map, dropping a stale assignment (harmless between runs: every start
#: writes a fresh one).
WORKER_IGNORE_CHANGES: list[str] = [
    f'metadata["{ASSIGNMENT_KEY}"]',
    "labels",
    "scheduling.maxRunDuration",
    "scheduling.instanceTerminationAction",
    "desiredStatus",
    "currentStatus",
]

BOOT_DISK_TYPE = "pd-balanced"
SERIAL_PORT_LOGGING = "serial-port-logging-enable"


def worker_scheduling(cfg: StackConfig) -> gcp.compute.InstanceSchedulingArgs:
    """GPU VMs cannot live-migrate: TERMINATE on maintenance, and never restart on their own.

    `instance_termination_action` is only accepted at creation for SPOT VMs ("You cannot
    specify a termination action for a VM instance that has the standard provisioning model");
    for standard VMs the control plane sets it, with `max_run_duration`, before each start.
    """
    if cfg.spot:
        return gcp.compute.InstanceSchedulingArgs(
            on_host_maintenance="TERMINATE",
            automatic_restart=False,
            provisioning_model="SPOT",
            preemptible=True,
            instance_termination_action="STOP",
        )
    return gcp.compute.InstanceSchedulingArgs(
        on_host_maintenance="TERMINATE",
        automatic_restart=False,
        provisioning_model="STANDARD",
        preemptible=False,
    )


class WorkerFleet(PcpComponent):
    TYPE = "pcp:infra:WorkerFleet"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        accounts: ServiceAccounts,
        bucket: StateBucket,
        network: WorkerNetwork,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        names = Names(cfg.stack, cfg.project)
        startup_script = paths.read_worker_startup_script()

        accelerators = (
            [gcp.compute.InstanceGuestAcceleratorArgs(type=cfg.gpu_type, count=cfg.gpu_count)]
            if cfg.attach_guest_accelerators
            else None
        )
        access_configs = (
            [gcp.compute.InstanceNetworkInterfaceAccessConfigArgs(network_tier="PREMIUM")]
            if cfg.external_ip
            else None
        )

        # The first boot (Nix install, then power-off: no run assigned) needs the bucket grants,
        # the firewall and, without external IPs, the NAT. Deliberately not the agent sdist:
        # it is replaced delete-first on every code change, and nothing replaced that way may be
        # a dependency of a VM (the engine could replace dependents, and with them the disks).
        # The startup script copes with a missing agent object (earlier agent, or power-off).
        boot_deps: list[pulumi.Resource] = [*bucket.grants, *network.firewalls]
        if network.nat is not None:
            boot_deps.append(network.nat)

        self.instances: list[gcp.compute.Instance] = []
        self.grants: list[gcp.compute.InstanceIAMMember] = []
        for index in range(cfg.worker_count):
            vm_name = names.worker_vm(index)
            node = worker_node(index)
            instance = gcp.compute.Instance(
                vm_name,
                project=cfg.project,
                name=vm_name,
                zone=cfg.zone,
                machine_type=cfg.machine_type,
                description=f"pcp {cfg.stack} {node} (started and stopped by the control plane)",
                boot_disk=gcp.compute.InstanceBootDiskArgs(
                    auto_delete=True,
                    initialize_params=gcp.compute.InstanceBootDiskInitializeParamsArgs(
                        image=cfg.boot_image,
                        size=cfg.boot_disk_gb,
                        type=BOOT_DISK_TYPE,
                    ),
                ),
                guest_accelerators=accelerators,
                scheduling=worker_scheduling(cfg),
                network_interfaces=[
                    gcp.compute.InstanceNetworkInterfaceArgs(
                        subnetwork=network.subnetwork.id,
                        access_configs=access_configs,
                    )
                ],
                service_account=gcp.compute.InstanceServiceAccountArgs(
                    email=accounts.emails["worker"],
                    scopes=["cloud-platform"],
                ),
                metadata={
                    META_STACK: cfg.stack,
                    META_BUCKET: names.bucket,
                    META_PROJECT: cfg.project,
                    META_NODE: node,
                    **cfg.worker_gpu_metadata(),
                    **cfg.worker_bootstrap_metadata(),
                    "enable-oslogin": "TRUE",
                    # Serial port 1 to Cloud Logging: the dead-man switch's power-off line
                    # (the images run no logging agent). An organization policy
                    # compute.disableSerialPortLogging overrides it (docs/reliability.md).
                    SERIAL_PORT_LOGGING: "TRUE",
                    # In metadata (not metadata_startup_script, which forces a new VM and so
                    # a new disk): a changed script is applied in place, on the next boot.
                    "startup-script": startup_script,
                },
                labels=names.labels(**{LABEL_ROLE: "worker", LABEL_NODE: node}),
                tags=[names.worker_tag],
                # Shape changes (machine type, service account) need a stop; the provider
                # restarts a VM that was running. Deploy between runs.
                allow_stopping_for_update=True,
                deletion_protection=False,
                opts=self.child_opts(*boot_deps, ignore_changes=list(WORKER_IGNORE_CHANGES)),
            )
            self.instances.append(instance)
            # The functions may drive exactly these VMs.
            self.grants.append(
                gcp.compute.InstanceIAMMember(
                    f"{vm_name}-functions-fleet-control",
                    project=cfg.project,
                    zone=cfg.zone,
                    instance_name=instance.name,
                    role=accounts.fleet_control_role.name,
                    member=accounts.members["functions"],
                    opts=self.child_opts(),
                )
            )

        self.vm_names: list[pulumi.Output[str]] = [vm.name for vm in self.instances]
        self.register_outputs({"vm_names": self.vm_names})
