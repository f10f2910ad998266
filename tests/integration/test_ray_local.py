"""Local Ray listens on loopback only."""

from __future__ import annotations

import ipaddress

import psutil
import pytest

pytestmark = pytest.mark.integration


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_loopback_check_itself():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("::ffff:127.0.0.1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("::") and not _is_loopback("192.0.2.2")


def test_local_ray_binds_loopback_only():
    import ray

    from tasks.actors import ensure_ray

    assert ensure_ray() is True
    try:
        session = ray._private.worker._global_node.session_name
        ours = {psutil.Process().pid} | {c.pid for c in psutil.Process().children(recursive=True)}
        # Ray's daemons are found by the session they belong to.
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if session in " ".join(proc.info["cmdline"] or []):
                ours.add(proc.info["pid"])
        listening = [
            c for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in ours
        ]
        assert len(listening) >= 3, "found too few listening Ray sockets to check"
        exposed = [c.laddr for c in listening if not _is_loopback(c.laddr.ip)]
        assert exposed == [], f"Ray listens beyond loopback: {exposed}"
    finally:
        ray.shutdown()
