"""Emulated WAN links on one Linux machine: network namespaces, veth pairs, a bridge and tbf.

``Network`` builds a star: one "hub" namespace holding a bridge, and one namespace per host
(peers, the store) joined to it by a veth pair. Every host gets an address in
``10.213.0.0/24``, which exists only inside these namespaces (the root namespace and its
routes are never touched). A host with a rate gets ``tc ... tbf`` on both ends of its veth
pair: egress on the host side shapes its uplink, egress on the hub side its downlink, so a
"10 Mbit/s peer" is 10 Mbit/s each way, like a symmetric consumer link.

Only bandwidth is emulated: ``netem`` (delay, loss) is not available on the machines this
was written for, so round-trip times are those of a veth (microseconds). Names start with
``lsw<pid>`` so concurrent runs cannot collide and ``cleanup_leftovers`` can remove what a
killed run left behind (namespaces of processes that no longer exist) without touching a
live run's. Needs root (CAP_NET_ADMIN) and iproute2's ``ip`` and ``tc``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

PREFIX = "lsw"
SUBNET = "10.213.0"
"""First three octets of the private /24 used inside the namespaces."""
COMMAND_TIMEOUT = 20.0
"""Seconds any one ``ip``/``tc`` call may take before we give up."""
TBF_LATENCY_MS = 100
"""tbf queue limit expressed as the longest a packet may wait (tc's ``latency``)."""


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed; the message carries the command and its stderr."""


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one iproute2 command, bounded in time; raise ``NetnsError`` with its stderr."""
    try:
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    out = _sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_available() -> str | None:
    """None when namespaces, veth pairs and tbf all work here; otherwise the reason they do not."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"iproute2's `{tool}` is not installed"
    probe = f"{PREFIX}{os.getpid()}probe"
    try:
        _sh("ip", "netns", "add", probe)
        try:
            _sh("ip", "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb")
            _sh("tc", "-n", probe, "qdisc", "add", "dev", "pa", "root", "tbf", "rate", "10mbit", "burst", "16kb",
                "latency", "50ms")
            _sh("ip", "-n", probe, "link", "add", "pbr", "type", "bridge")
        finally:
            _sh("ip", "netns", "del", probe, check=False)
    except NetnsError as exc:
        return f"network namespaces with veth, bridge and tbf are not usable here: {exc}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_leftovers() -> list[str]:
    """Delete namespaces named ``lsw<pid>...`` whose process is gone; returns what was deleted."""
    removed = []
    for name in list_namespaces():
        m = re.match(rf"^{PREFIX}(\d+)", name)
        if m and not _pid_alive(int(m.group(1))):
            _sh("ip", "netns", "del", name, check=False)
            removed.append(name)
    if removed:
        log.warning("removed leftover namespaces of dead runs: %s", ", ".join(removed))
    return removed


def tbf_burst_bytes(rate_mbit: float) -> int:
    """Bucket size: 10 ms at the line rate, at least 16 KiB (tbf needs burst >= rate / HZ
    plus one GSO super-packet, or it throttles below the configured rate)."""
    return max(16 * 1024, int(rate_mbit * 1e6 / 8 / 100))


@dataclass(frozen=True)
class Host:
    """One end point: its namespace, address, and link rate (None = unlimited)."""

    name: str
    netns: str
    ip: str
    rate_mbit: float | None
    veth: str
    """Interface name inside ``netns``; its peer in the hub namespace is ``veth + 'h'``."""


class Network:
    """Context manager: build the namespaces on enter, delete them all on exit (even on Ctrl-C).

    ``hosts`` maps a host name (letters, digits, '-') to its link rate in Mbit/s or None.
    """

    def __init__(self, hosts: dict[str, float | None], *, tag: str = ""):
        if not hosts or len(hosts) > 250:
            raise ValueError("a network needs between 1 and 250 hosts")
        for name, rate in hosts.items():
            if not re.fullmatch(r"[A-Za-z0-9-]{1,32}", name):
                raise ValueError(f"host name {name!r}: use 1-32 letters, digits or '-'")
            if rate is not None and rate <= 0:
                raise ValueError(f"host {name!r}: rate must be > 0 Mbit/s or None")
        if not re.fullmatch(r"[a-z0-9]{0,4}", tag):
            raise ValueError("tag: up to 4 lowercase letters or digits")
        self.prefix = f"{PREFIX}{os.getpid()}{tag}"
        self.hub = f"{self.prefix}hub"
        self.hosts: dict[str, Host] = {
            name: Host(name, f"{self.prefix}-{name}", f"{SUBNET}.{i + 1}", rate, f"{self.prefix}v{i}")
            for i, (name, rate) in enumerate(hosts.items())
        }
        if len(self.prefix) + 5 > 15:  # interface names are limited to 15 characters
            raise ValueError(f"prefix {self.prefix!r} too long for interface names")
        self._created: list[str] = []

    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.teardown()

    def _add_ns(self, name: str) -> None:
        _sh("ip", "netns", "add", name)
        self._created.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.hub)
        _sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for host in self.hosts.values():
            self._add_ns(host.netns)
            hub_end = host.veth + "h"
            _sh("ip", "-n", host.netns, "link", "add", host.veth, "type", "veth", "peer", "name", hub_end,
                "netns", self.hub)
            _sh("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", host.veth)
            _sh("ip", "-n", host.netns, "link", "set", host.veth, "up")
            _sh("ip", "-n", self.hub, "link", "set", hub_end, "master", "br0")
            _sh("ip", "-n", self.hub, "link", "set", hub_end, "up")
            if host.rate_mbit is not None:
                self._shape(host.netns, host.veth, host.rate_mbit)  # uplink
                self._shape(self.hub, hub_end, host.rate_mbit)  # downlink
        log.info("network %s: %s", self.prefix,
                 ", ".join(f"{h.name}={h.ip}@{h.rate_mbit or 'unlimited'}Mbit" for h in self.hosts.values()))

    @staticmethod
    def _shape(netns: str, dev: str, rate_mbit: float, verb: str = "add") -> None:
        _sh("tc", "-n", netns, "qdisc", verb, "dev", dev, "root", "tbf", "rate", f"{rate_mbit:g}mbit",
            "burst", str(tbf_burst_bytes(rate_mbit)), "latency", f"{TBF_LATENCY_MS}ms")

    def set_rate(self, host: str, rate_mbit: float) -> None:
        """Change a shaped host's link rate both ways while traffic flows (``tc qdisc change``):
        a link that degrades for a while and comes back."""
        h = self.hosts[host]
        if h.rate_mbit is None:
            raise ValueError(f"host {host!r} has no shaped link to change")
        self._shape(h.netns, h.veth, rate_mbit, "change")
        self._shape(self.hub, h.veth + "h", rate_mbit, "change")
        log.info("link of %s now %g Mbit/s", host, rate_mbit)

    def teardown(self) -> None:
        """Delete every namespace this network created (their veths and qdiscs go with them)."""
        while self._created:
            name = self._created.pop()
            proc = _sh("ip", "netns", "del", name, check=False)
            if proc.returncode != 0:
                log.error("could not delete namespace %s: %s", name, proc.stderr.strip())

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host].netns, *argv]

    def ip(self, host: str) -> str:
        return self.hosts[host].ip
