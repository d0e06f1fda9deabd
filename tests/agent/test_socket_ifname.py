"""`--socket-ifname`: NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME for the binary."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcp.agent.session import default_route_interface, socket_env

pytestmark = pytest.mark.agent

ROUTES = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "ens4\t0080000A\t00000000\t0001\t0\t0\t0\t00F0FFFF\t0\t0\t0\n"
    "ens4\t00000000\t0180000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
)


def test_auto_takes_the_default_route_interface(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(ROUTES)
    assert default_route_interface(str(table)) == "ens4"
    assert socket_env("auto", str(table)) == {"NCCL_SOCKET_IFNAME": "ens4",
                                              "GLOO_SOCKET_IFNAME": "ens4"}


def test_a_name_is_taken_as_given_and_none_sets_nothing(tmp_path: Path) -> None:
    assert socket_env("eth1") == {"NCCL_SOCKET_IFNAME": "eth1", "GLOO_SOCKET_IFNAME": "eth1"}
    assert socket_env(None) == {}
    table = tmp_path / "route"
    table.write_text(ROUTES.splitlines()[0] + "\n")  # no default route
    assert socket_env("auto", str(table)) == {}
    assert socket_env("auto", str(tmp_path / "missing")) == {}
