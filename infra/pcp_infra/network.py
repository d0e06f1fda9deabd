"""The workers' own VPC, subnet and firewall (plus Cloud NAT when workers have no external IP).

A dedicated VPC keeps stacks isolated and does not rely on the project's `default` network (which
organisation policy often removes). VPC ingress is denied unless a rule below allows it; egress is
allowed (workers reach the shepherd on the internet, Cachix, and Google APIs).
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import Names

from .base import PcpComponent
from .config import StackConfig

#: The workers' subnet (each stack has its own VPC, so ranges may repeat across stacks).
WORKER_SUBNET_CIDR = "10.42.0.0/24"


class WorkerNetwork(PcpComponent):
    TYPE = "pcp:infra:WorkerNetwork"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        names = Names(cfg.stack, cfg.project)
        prefix = names.prefix
        tag = names.worker_tag

        self.network = gcp.compute.Network(
            f"{prefix}-net",
            project=cfg.project,
            name=names.network,
            auto_create_subnetworks=False,
            routing_mode="REGIONAL",
            description=f"pcp {cfg.stack} workers",
            opts=self.child_opts(),
        )
        self.subnetwork = gcp.compute.Subnetwork(
            f"{prefix}-subnet",
            project=cfg.project,
            name=names.subnetwork,
            region=cfg.region,
            network=self.network.id,
            ip_cidr_range=WORKER_SUBNET_CIDR,
            # Workers without an external IP still reach GCS and the other Google APIs.
            private_ip_google_access=True,
            opts=self.child_opts(),
        )

        self.firewalls: list[gcp.compute.Firewall] = [
            # Worker <-> worker on every TCP port (no `ports`: all of them): gloo and NCCL
            # listen on ephemeral ports on every rank, the store on any free port, and either
            # side of a pair may dial. The sources are the stack's own subnet (its VPC holds
            # nothing else) and the worker tag; nothing outside the stack matches either.
            gcp.compute.Firewall(
                f"{prefix}-fw-worker-internal",
                project=cfg.project,
                name=f"{prefix}-worker-internal",
                network=self.network.id,
                direction="INGRESS",
                allows=[
                    gcp.compute.FirewallAllowArgs(protocol="tcp"),
                    gcp.compute.FirewallAllowArgs(protocol="icmp"),
                ],
                source_ranges=[WORKER_SUBNET_CIDR],
                source_tags=[tag],
                target_tags=[tag],
                description="pcp workers talk to each other on every TCP port inside the "
                            "stack's subnet",
                opts=self.child_opts(),
            ),
            # SSH only through IAP TCP forwarding (`gcloud compute ssh --tunnel-through-iap`).
            gcp.compute.Firewall(
                f"{prefix}-fw-ssh",
                project=cfg.project,
                name=f"{prefix}-worker-ssh",
                network=self.network.id,
                direction="INGRESS",
                allows=[gcp.compute.FirewallAllowArgs(protocol="tcp", ports=["22"])],
                source_ranges=list(cfg.worker_ssh_source_ranges),
                target_tags=[tag],
                description="SSH to pcp workers via IAP only",
                opts=self.child_opts(),
            ),
        ]
        if cfg.allow_shepherd_from:
            # Optional: collective backends that open connections from rank 0 to the others
            # (e.g. gloo) need the shepherd to reach the workers on the run's ports.
            self.firewalls.append(
                gcp.compute.Firewall(
                    f"{prefix}-fw-shepherd",
                    project=cfg.project,
                    name=f"{prefix}-worker-from-shepherd",
                    network=self.network.id,
                    direction="INGRESS",
                    allows=[
                        gcp.compute.FirewallAllowArgs(protocol="tcp", ports=list(cfg.worker_ports))
                    ],
                    source_ranges=list(cfg.allow_shepherd_from),
                    target_tags=[tag],
                    description="the pcp shepherd reaches the workers on the run's ports",
                    opts=self.child_opts(),
                )
            )

        self.router: gcp.compute.Router | None = None
        self.nat: gcp.compute.RouterNat | None = None
        self.egress: gcp.compute.Address | None = None
        if not cfg.external_ip:
            # Without external IPs the workers need NAT for the shepherd and Cachix. The NAT
            # uses one reserved address, so every worker reaches the shepherd from a single
            # stable IP (the stack output `worker_egress_ip`) that the shepherd host's
            # firewall can admit alone (docs/agent.md).
            self.egress = gcp.compute.Address(
                f"{prefix}-egress",
                project=cfg.project,
                name=names.egress_address,
                region=cfg.region,
                address_type="EXTERNAL",
                description=f"pcp {cfg.stack} workers' egress (Cloud NAT)",
                opts=self.child_opts(),
            )
            self.router = gcp.compute.Router(
                f"{prefix}-router",
                project=cfg.project,
                name=f"{prefix}-router",
                region=cfg.region,
                network=self.network.id,
                opts=self.child_opts(),
            )
            self.nat = gcp.compute.RouterNat(
                f"{prefix}-nat",
                project=cfg.project,
                name=f"{prefix}-nat",
                region=cfg.region,
                router=self.router.name,
                nat_ip_allocate_option="MANUAL_ONLY",
                nat_ips=[self.egress.self_link],
                source_subnetwork_ip_ranges_to_nat="ALL_SUBNETWORKS_ALL_IP_RANGES",
                opts=self.child_opts(),
            )

        self.register_outputs(
            {"network": self.network.name, "subnetwork": self.subnetwork.name, "tag": tag}
        )
