"""A slow link between two "machines" on one host, for benchmarks: two network namespaces joined by a veth pair
whose two ends are rate-limited by `tc` (a token bucket; this kernel has no netem, so no added delay).
Needs root, `ip` and `tc` (`available()` says).

    link_up("400mbit")   # NS[0] at ADDR[0] <-> NS[1] at ADDR[1]
    subprocess.run(in_ns(0, ["python", ...]))
    link_down()
"""

from __future__ import annotations

import os
import shutil
import subprocess

NS = ("mdbench0", "mdbench1")
ADDR = ("10.77.0.1", "10.77.0.2")
DEV = ("mdv0", "mdv1")


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def link_up(rate: str) -> None:
    """Both namespaces and the shaped veth pair (each direction limited to `rate`)."""
    link_down()
    for ns in NS:
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", DEV[0], "type", "veth", "peer", "name", DEV[1])
    for ns, dev, addr in zip(NS, DEV, ADDR):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms")


def link_down() -> None:
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_ns(node: int, argv: list[str]) -> list[str]:
    """`argv` run inside namespace `node`."""
    return ["ip", "netns", "exec", NS[node], *argv]
