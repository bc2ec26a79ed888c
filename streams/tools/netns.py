"""Hosts and a network on one machine: Linux network namespaces joined by one switch, for ``memstream chaos``'s
network scenarios and their integration test.

Each *host* is a network namespace (``ip netns``) with one interface, ``eth0``, holding one address on a private
/24 chosen so that it overlaps no route or address of this machine; ``lo`` is up too. The process that builds the
network (the *driver*: the chaos scenario, which publishes and audits) stays in the root namespace and is a host
like the others, on the subnet's ``.1``. The namespaces get no default route, so their traffic stays between them
and the driver.

Two kinds of links, one interface to the callers:

- ``veth``: a veth pair per host, the outer end on one Linux bridge in the root namespace (the driver's address is
  the bridge's). A link delay is ``tc netem`` on each host's ``eth0`` (egress: one way between two hosts is one
  delay, a round trip two) and on the bridge.
- ``tap``: for kernels without ``sch_netem`` (``tc qdisc add ... netem`` answers "Specified qdisc kind is
  unknown"). Each host's ``eth0`` is a TAP device whose other side is a small switch process of this module
  (``python -m streams.tools.netns switch``): it learns MAC addresses as a bridge does and holds every frame for
  the delay before it forwards it, so the delay is again one per hop out of the sender. The driver's TAP device
  stays in the root namespace. The switch is user space: it adds its own latency (tens of microseconds a frame)
  and CPU, and it drops a frame (as a wire would) where the receiving interface is down.

Faults are the kernel's, whichever the links: :meth:`Network.link_down` (``ip link set eth0 down`` in the host:
nothing in or out, no FIN or RST reaches anyone, as a cut cable or a partition), :meth:`Network.kill_host` (link
down, then SIGKILL of every process in the namespace: a host lost, not a process that crashed and closed its
sockets).

Every name starts with ``msn<pid in hex>-``: :func:`remove_stale` deletes what a run that died left behind (its pid
gone), and :meth:`Network.close` (also on an exception or a Ctrl-C, as a context manager) everything of this run.
Root only: :func:`unavailable` says why not, for a clear skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import logging
import os
import random
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("memstream.netns")

PREFIX = "msn"  # every namespace, link and bridge this module creates: msn<pid hex>-...
IP = "ip"
TC = "tc"
Links = Literal["auto", "veth", "tap"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
SWITCH_READY = "switch ready"
TAP_MTU = 65_000  # few, large frames: the user-space switch's cost is per frame


class NetnsError(RuntimeError):
    """A command of the harness failed (the command and its stderr are in the message)."""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why the harness cannot run here (None: it can): it needs root and the ``ip`` and ``tc`` commands."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root, or skip the network scenarios"
    for tool in (IP, TC):
        if shutil.which(tool) is None:
            return f"the {tool!r} command (iproute2) is not installed"
    return None


def netem_supported() -> bool:
    """Whether this kernel has ``sch_netem`` (tried on ``lo`` of a throwaway namespace)."""
    probe = f"{PREFIX}{os.getpid():x}-probe"
    try:
        run(IP, "netns", "add", probe)
    except NetnsError:
        return False
    try:
        return (
            run(TC, "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False).returncode
            == 0
        )
    finally:
        run(IP, "netns", "del", probe, check=False)


# ---------------------------------------------------------------------------------------------- stale runs


def _run_pid(name: str) -> int | None:
    match = re.match(rf"{PREFIX}([0-9a-f]+)-", name)
    return int(match.group(1), 16) if match else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces(prefix: str = PREFIX) -> list[str]:
    """The network namespaces whose name starts with ``prefix``."""
    listed = run(IP, "netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in listed if line.startswith(prefix)]


def links(prefix: str = PREFIX) -> list[str]:
    """Root-namespace interfaces whose name starts with ``prefix`` (bridges, outer veth ends, the driver's TAP)."""
    listed = run(IP, "-o", "link", "show", check=False).stdout.splitlines()
    names = [line.split(":")[1].strip().split("@")[0] for line in listed if ":" in line]
    return [n for n in names if n.startswith(prefix)]


def kill_namespace_processes(ns: str) -> list[int]:
    """SIGKILL every process in network namespace ``ns``; the pids signalled."""
    pids = [int(p) for p in run(IP, "netns", "pids", ns, check=False).stdout.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def remove_stale() -> list[str]:
    """Delete the namespaces and links of runs of this harness whose process is gone; what was removed."""
    removed = []
    for ns in namespaces():
        pid = _run_pid(ns)
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            kill_namespace_processes(ns)
            run(IP, "netns", "del", ns, check=False)
            removed.append(ns)
    for link in links():
        pid = _run_pid(link)
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            run(IP, "link", "del", link, check=False)
            removed.append(link)
    return removed


# --------------------------------------------------------------------------------------------- the network


@dataclass(frozen=True)
class Host:
    name: str  # e.g. "redis"
    ns: str  # its network namespace
    ip: str

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run on this host (``ip netns exec`` execs it: the pid is the command's own)."""
        return [IP, "netns", "exec", self.ns, *command]


def pick_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps no address or route of the root namespace (nor another run's)."""
    rng = rng or random.Random()
    taken: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for line in run(IP, "-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        for word in line.split():  # the first word that is an address or a network: "local 10.1.2.3 dev ..."
            with contextlib.suppress(ValueError):
                taken.append(ipaddress.ip_network(word, strict=False))
                break
    for line in run(IP, "-4", "-o", "addr", "show", check=False).stdout.splitlines():
        with contextlib.suppress(ValueError, IndexError):
            taken.append(ipaddress.ip_interface(line.split()[3]).network)
    for _ in range(1000):
        candidate = ipaddress.IPv4Network(f"10.{rng.randrange(64, 250)}.{rng.randrange(0, 256)}.0/24")
        if not any(candidate.overlaps(t) for t in taken if t.prefixlen > 0):
            return candidate
    raise NetnsError("no free 10.x.y.0/24 subnet")


@dataclass
class Network:
    """Hosts (network namespaces) on one switch; see the module docstring. Use as a context manager."""

    names: Sequence[str]
    delay_ms: float = 0.0
    kind: Links = "auto"
    run_id: str = field(default_factory=lambda: f"{PREFIX}{os.getpid():x}")
    hosts: dict[str, Host] = field(default_factory=dict)
    driver_ip: str = ""
    subnet: ipaddress.IPv4Network | None = None
    switch: subprocess.Popen[str] | None = None
    _created_ns: list[str] = field(default_factory=list)
    _created_links: list[str] = field(default_factory=list)

    def __enter__(self) -> Network:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building

    def create(self) -> None:
        why = unavailable()
        if why:
            raise NetnsError(why)
        removed = remove_stale()
        if removed:
            log.info("removed what earlier runs left: %s", ", ".join(removed))
        if self.kind == "auto":
            self.kind = "veth" if self.delay_ms <= 0 or netem_supported() else "tap"
        self.subnet = pick_subnet()
        addresses = list(self.subnet.hosts())
        self.driver_ip = str(addresses[0])
        for i, name in enumerate(self.names, start=1):
            ns = f"{self.run_id}-{name}"
            run(IP, "netns", "add", ns)
            self._created_ns.append(ns)
            self.hosts[name] = Host(name, ns, str(addresses[i]))
            run(IP, "-n", ns, "link", "set", "lo", "up")
        if self.kind == "veth":
            self._veth_links()
        else:
            self._tap_links()
        log.info(
            "network %s (%s links, %g ms a hop): driver %s, %s",
            self.subnet,
            self.kind,
            self.delay_ms,
            self.driver_ip,
            ", ".join(f"{h.name} {h.ip}" for h in self.hosts.values()),
        )

    def _veth_links(self) -> None:
        bridge = f"{self.run_id}-br"
        run(IP, "link", "add", bridge, "type", "bridge")
        self._created_links.append(bridge)
        run(IP, "addr", "add", f"{self.driver_ip}/24", "dev", bridge)
        run(IP, "link", "set", bridge, "up")
        for i, host in enumerate(self.hosts.values()):
            outer = f"{self.run_id}-v{i}"
            run(IP, "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            self._created_links.append(outer)
            run(IP, "link", "set", outer, "master", bridge, "up")
            self._address(host)
        if self.delay_ms > 0:
            delay = f"{self.delay_ms:g}ms"
            for host in self.hosts.values():
                run(TC, "-n", host.ns, "qdisc", "add", "dev", "eth0", "root", "netem", "delay", delay)
            run(TC, "qdisc", "add", "dev", bridge, "root", "netem", "delay", delay)  # the driver's way out

    def _tap_links(self) -> None:
        taps = [f"{self.run_id}-t{i}" for i in range(len(self.hosts) + 1)]  # the last one: the driver's
        self.switch = subprocess.Popen(
            [sys.executable, "-m", "streams.tools.netns", "switch", "--delay-ms", str(self.delay_ms), *taps],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C reaches the driver, which closes the network in order
        )
        assert self.switch.stdout is not None
        line = self.switch.stdout.readline()
        if SWITCH_READY not in line:
            raise NetnsError(f"the switch did not start (exit {self.switch.wait()}): {line.strip()}")
        for tap, host in zip(taps, self.hosts.values(), strict=False):
            run(IP, "link", "set", tap, "netns", host.ns)
            run(IP, "-n", host.ns, "link", "set", tap, "name", "eth0")
            run(IP, "-n", host.ns, "link", "set", "eth0", "mtu", str(TAP_MTU))
            self._address(host)
        driver = taps[-1]
        run(IP, "link", "set", driver, "mtu", str(TAP_MTU))
        run(IP, "addr", "add", f"{self.driver_ip}/24", "dev", driver)
        run(IP, "link", "set", driver, "up")

    def _address(self, host: Host) -> None:
        run(IP, "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        run(IP, "-n", host.ns, "link", "set", "eth0", "up")

    # -- faults

    def link_down(self, name: str) -> None:
        """Cut ``name`` off the network: nothing leaves or reaches it (its processes run on, unaware)."""
        run(IP, "-n", self.hosts[name].ns, "link", "set", "eth0", "down")

    def link_up(self, name: str) -> None:
        run(IP, "-n", self.hosts[name].ns, "link", "set", "eth0", "up")

    def kill_host(self, name: str) -> list[int]:
        """The host lost: its link cut first (no FIN or RST of its sockets reaches anyone), then every process on
        it SIGKILLed. The link stays down. Returns the pids killed."""
        self.link_down(name)
        return kill_namespace_processes(self.hosts[name].ns)

    # -- teardown

    def close(self) -> None:
        """Kill every process in this run's namespaces, delete them, the links and the switch."""
        for ns in self._created_ns:
            kill_namespace_processes(ns)
        deadline = time.monotonic() + 5
        for ns in self._created_ns:
            while run(IP, "netns", "pids", ns, check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.05)
            run(IP, "netns", "del", ns, check=False)
        for link in self._created_links:
            if link in links(f"{self.run_id}-"):
                run(IP, "link", "del", link, check=False)
        if self.switch is not None and self.switch.poll() is None:
            self.switch.kill()
            self.switch.wait()
        self._created_ns.clear()
        self._created_links.clear()

    def leftovers(self) -> list[str]:
        """This run's namespaces and root links still present (empty after :meth:`close`)."""
        return namespaces(f"{self.run_id}-") + links(f"{self.run_id}-")


@contextlib.contextmanager
def network(names: Sequence[str], delay_ms: float = 0.0, kind: Links = "auto") -> Iterator[Network]:
    with Network(names, delay_ms, kind) as net:
        yield net


# ----------------------------------------------------------------------------------- the user-space switch


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI))
    return fd


def run_switch(taps: Sequence[str], delay_ms: float) -> None:
    """Forward Ethernet frames between ``taps`` as a learning bridge, each held ``delay_ms`` first. Every frame is
    delayed by the same amount, so the queue stays in due order (one deque, no heap)."""
    fds = [open_tap(name) for name in taps]
    delay = delay_ms / 1e3
    selector = selectors.DefaultSelector()
    for index, fd in enumerate(fds):
        selector.register(fd, selectors.EVENT_READ, index)
    ports = range(len(fds))
    where: dict[bytes, int] = {}  # MAC -> port
    queue: deque[tuple[float, tuple[int, ...], bytes]] = deque()
    print(SWITCH_READY, flush=True)
    while True:
        timeout = None if not queue else max(0.0, queue[0][0] - time.monotonic())
        for key, _ in selector.select(timeout):
            port: int = key.data
            for _ in range(256):
                try:
                    frame = os.read(fds[port], 65_536)
                except OSError:  # BlockingIOError: nothing more; EIO: the interface went away
                    break
                if len(frame) < 14:
                    continue
                where[frame[6:12]] = port
                to = where.get(frame[0:6]) if not frame[0] & 1 else None
                if to == port:
                    continue
                out = (to,) if to is not None else tuple(p for p in ports if p != port)
                queue.append((time.monotonic() + delay, out, frame))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, targets, frame = queue.popleft()
            for target in targets:
                with contextlib.suppress(OSError):  # EIO: that host's link is down; the frame is lost, as on a wire
                    os.write(fds[target], frame)


def die_with_parent() -> None:
    """SIGKILL from the kernel when the driver dies, even by SIGKILL: no orphaned switch holding TAP devices
    (the next run's :func:`remove_stale` removes the namespaces and links the dead driver left)."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the driver died before prctl took effect
        raise SystemExit(1)


def main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m streams.tools.netns")
    sub = parser.add_subparsers(dest="command", required=True)
    switch = sub.add_parser("switch", help="the user-space switch between TAP devices (used by Network)")
    switch.add_argument("--delay-ms", type=float, default=0.0)
    switch.add_argument("taps", nargs="+")
    sub.add_parser("clean", help="remove the namespaces and links that dead runs of the harness left")
    args = parser.parse_args(argv)
    if args.command == "switch":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver closes the network, then stops the switch
        die_with_parent()
        try:
            run_switch(args.taps, args.delay_ms)
        except OSError as exc:
            print(f"switch failed: {exc}", flush=True)
            return 1
        return 0
    print("\n".join(remove_stale()) or "nothing stale")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
