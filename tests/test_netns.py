"""bench.netns: namespaces joined by tbf-shaped veth links really limit throughput, a link's
rate can change while it carries traffic, and the namespaces go away.

Namespace tests need root and iproute2; otherwise they skip with ``netns_available``'s reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.netns import (
    PREFIX,
    Network,
    cleanup_leftovers,
    list_namespaces,
    netns_available,
)

REASON = netns_available()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"netns unavailable: {REASON}")
pytestmark = pytest.mark.timeout(60)

RATE_MBIT = 20
NBYTES = 3 * 1024 * 1024
PORT = 5201

# One TCP transfer of NBYTES: "serve-send" / "serve-recv" listen on argv[2]; "send" / "recv"
# connect to argv[2]. The receiving side prints {"bytes", "seconds"} from first byte to EOF.
TRANSFER = r"""
import json, socket, sys, time
mode, addr, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
host, port = addr.rsplit(":", 1)
if mode.startswith("serve"):
    srv = socket.create_server((host, int(port)))
    srv.settimeout(20)
    conn, _ = srv.accept()
else:
    deadline = time.time() + 10
    while True:
        try:
            conn = socket.create_connection((host, int(port)), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
conn.settimeout(20)
if mode.endswith("send"):
    conn.sendall(b"\0" * n)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
else:
    got, t0 = 0, None
    while True:
        b = conn.recv(1 << 16)
        if not b:
            break
        t0 = t0 or time.perf_counter()
        got += len(b)
    print(json.dumps({"bytes": got, "seconds": time.perf_counter() - t0}))
conn.close()
"""


def _transfer(net: Network, server_host: str, server_mode: str, client_host: str, client_mode: str) -> dict:
    """Run one transfer between two namespaces; return the receiver's measurement."""
    addr = f"{net.ip(server_host)}:{PORT}"
    server = subprocess.Popen(net.exec_argv(server_host, [sys.executable, "-c", TRANSFER, server_mode, addr, str(NBYTES)]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = subprocess.run(net.exec_argv(client_host, [sys.executable, "-c", TRANSFER, client_mode, addr, str(NBYTES)]),
                                check=False, capture_output=True, text=True, timeout=30)
        out, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)
    assert client.returncode == 0, client.stderr
    assert server.returncode == 0, err
    result = json.loads(client.stdout if client_mode == "recv" else out)
    assert result["bytes"] == NBYTES
    return result


def _mbit(result: dict) -> float:
    return result["bytes"] * 8 / result["seconds"] / 1e6


@needs_netns
def test_tbf_link_limits_both_directions_and_teardown_leaves_nothing():
    with Network({"peer": RATE_MBIT, "store": None}) as net:
        prefix = net.prefix
        assert {h.netns for h in net.hosts.values()} <= set(list_namespaces())
        down = _mbit(_transfer(net, "store", "serve-send", "peer", "recv"))
        up = _mbit(_transfer(net, "store", "serve-recv", "peer", "send"))
    # Unshaped veth moves several Gbit/s; a 20 Mbit/s bucket must hold both directions near 20.
    assert 10 < down < 30, f"downlink measured {down:.1f} Mbit/s through a {RATE_MBIT} Mbit/s tbf"
    assert 10 < up < 30, f"uplink measured {up:.1f} Mbit/s through a {RATE_MBIT} Mbit/s tbf"
    assert not [n for n in list_namespaces() if n.startswith(prefix)]


@needs_netns
def test_a_link_slowed_mid_run_limits_both_directions_and_comes_back():
    with Network({"peer": RATE_MBIT, "store": None}, tag="s") as net:
        net.set_rate("peer", 5)
        down = _mbit(_transfer(net, "store", "serve-send", "peer", "recv"))
        up = _mbit(_transfer(net, "store", "serve-recv", "peer", "send"))
        net.set_rate("peer", RATE_MBIT)
        back = _mbit(_transfer(net, "store", "serve-send", "peer", "recv"))
    assert 2.5 < down < 7.5, f"downlink measured {down:.1f} Mbit/s after slowing the link to 5"
    assert 2.5 < up < 7.5, f"uplink measured {up:.1f} Mbit/s after slowing the link to 5"
    assert back > 10, f"the restored {RATE_MBIT} Mbit/s link gave only {back:.1f} Mbit/s"


def test_only_a_shaped_link_can_change_rate():
    with pytest.raises(ValueError, match="no shaped link"):
        Network({"free": None}).set_rate("free", 5)


@needs_netns
def test_unlimited_link_is_much_faster_than_the_shaped_one():
    with Network({"a": None, "b": None}, tag="u") as net:
        fast = _mbit(_transfer(net, "b", "serve-send", "a", "recv"))
    assert fast > 3 * RATE_MBIT, f"an unshaped veth gave only {fast:.1f} Mbit/s"


@needs_netns
def test_network_is_torn_down_when_the_body_raises():
    with pytest.raises(KeyboardInterrupt), Network({"x": 5}, tag="k") as net:
        prefix = net.prefix
        raise KeyboardInterrupt
    assert not [n for n in list_namespaces() if n.startswith(prefix)]


@needs_netns
def test_leftovers_of_dead_runs_are_removed_but_live_runs_kept():
    dead = f"{PREFIX}4194999x"  # above Linux's pid_max, so never a live process
    subprocess.run(["ip", "netns", "add", dead], check=True, timeout=10)
    with Network({"live": None}, tag="l") as net:
        removed = cleanup_leftovers()
        assert dead in removed
        assert net.hosts["live"].netns in list_namespaces()
    assert dead not in list_namespaces()


def test_prefix_names_the_running_process():
    net = Network({"p": 1})
    assert net.prefix.startswith(f"{PREFIX}{os.getpid()}")
