"""A real local Redis Cluster: N masters (and replicas) of ``redis-server --cluster-enabled``.

Used by the test fixture (tests/cluster/conftest.py), ``slotguard up --cluster N`` and
``slotguard chaos`` (master kill and replica promotion). Every node runs on a free loopback
port whose cluster-bus port (+10000) is free too, with its data in a private directory; the
cluster is formed by ``redis-cli --cluster create ... --cluster-replicas R --cluster-yes``
and :meth:`LocalCluster.start` returns once every node reports ``cluster_state:ok``, knows
every node and every slot, and every replica's link to its master is up.
:meth:`LocalCluster.stop` kills every node and removes the directory.

With ``stall_proxies=True`` every node sits behind a loopback proxy of ours
(:class:`slotguard.stall_proxy.StallProxy`) and announces the proxy's port
(``cluster-announce-port``; its cluster bus stays direct, ``cluster-announce-bus-port``):
CLUSTER SLOTS, MOVED and ASK name the proxies, so every client connection (API, workers,
a replica's link to its master) goes through them and :meth:`LocalCluster.stall` stops
them all at once, while the nodes still see each other (no failover).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


class ClusterStartError(RuntimeError):
    pass


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """``count`` ports whose cluster-bus ports (port + 10000) are free as well."""
    ports: list[int] = []
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    while len(ports) < count:
        port = rng.randrange(20_000, 45_000)
        if port in ports or port + 10_000 in ports:
            continue
        if _bindable(port) and _bindable(port + 10_000):
            ports.append(port)
    return ports


def _command(port: int, *args: str, timeout: float = 5.0) -> str:
    result = subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), *args],
                            capture_output=True, text=True, timeout=timeout)
    return result.stdout


def _info(port: int, *args: str) -> dict[str, str]:
    out = {}
    try:
        text = _command(port, *args)
    except subprocess.TimeoutExpired:
        return out
    for line in text.splitlines():
        if ":" in line:
            key, _, value = line.strip().partition(":")
            out[key] = value
    return out


@dataclass
class Node:
    port: int
    dir: Path
    process: subprocess.Popen | None = None
    proxy: object | None = None  # slotguard.stall_proxy.StallProxy, with stall_proxies

    @property
    def announced_port(self) -> int:
        """The port the cluster tells clients (the proxy's, with stall_proxies)."""
        return self.proxy.port if self.proxy is not None else self.port

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LocalCluster:
    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 3_000
    base_dir: Path | None = None
    stall_proxies: bool = False
    nodes: list[Node] = field(default_factory=list)
    _own_dir: bool = False

    # ---- life cycle -------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> LocalCluster:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="slotguard-cluster-"))
            self._own_dir = True
        total = self.masters * (1 + self.replicas)
        self.nodes = [Node(port, self.base_dir / str(port))
                      for port in free_cluster_ports(total)]
        try:
            if self.stall_proxies:
                from slotguard.stall_proxy import StallProxy

                for node in self.nodes:
                    node.proxy = StallProxy(HOST, node.port).start()
            for node in self.nodes:
                self._spawn(node)
            deadline = time.monotonic() + timeout_s
            for node in self.nodes:
                self._wait_ping(node, deadline)
            if self.masters >= 3:
                result = subprocess.run(
                    ["redis-cli", "--cluster", "create", *(n.address for n in self.nodes),
                     "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                    capture_output=True, text=True, timeout=timeout_s)
                if result.returncode != 0:
                    raise ClusterStartError(f"redis-cli --cluster create failed: "
                                            f"{result.stdout[-2000:]} {result.stderr[-2000:]}")
            else:
                self._form_by_hand(deadline)
            self.wait_healthy(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, node: Node) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        node.process = subprocess.Popen(
            ["redis-server", "--port", str(node.port), "--bind", HOST,
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             "--cluster-replica-validity-factor", "0",
             *(("--cluster-announce-ip", HOST,
                "--cluster-announce-port", str(node.proxy.port),
                "--cluster-announce-bus-port", str(node.port + 10_000))
               if node.proxy is not None else ()),
             "--dir", str(node.dir), "--save", "", "--appendonly", "no",
             "--pidfile", str(node.dir / "redis.pid"),
             "--maxmemory-policy", "noeviction", "--protected-mode", "no",
             "--logfile", str(node.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    @staticmethod
    def _wait_ping(node: Node, deadline: float) -> None:
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise ClusterStartError(f"redis-server on {node.port} exited "
                                        f"({node.process.returncode}); see {node.dir}")
            try:
                if _command(node.port, "PING").strip() == "PONG":
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.05)
        raise ClusterStartError(f"redis-server on {node.port} did not answer")

    def _form_by_hand(self, deadline: float) -> None:
        """1 or 2 masters (redis-cli refuses fewer than 3): slots split evenly by hand,
        nodes met, replicas attached with CLUSTER REPLICATE."""
        masters, replicas = self.nodes[:self.masters], self.nodes[self.masters:]
        per = 16384 // self.masters
        for i, node in enumerate(masters):
            first = i * per
            last = 16383 if i == self.masters - 1 else (i + 1) * per - 1
            _command(node.port, "CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
        for node in self.nodes[1:]:
            _command(node.port, "CLUSTER", "MEET", HOST, str(self.nodes[0].port))
        for i, replica in enumerate(replicas):
            master = masters[i % self.masters]
            master_id = _command(master.port, "CLUSTER", "MYID").strip()
            while time.monotonic() < deadline:
                reply = _command(replica.port, "CLUSTER", "REPLICATE", master_id).strip()
                if reply == "OK":
                    break
                time.sleep(0.2)

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Every live node: state ok, every node known, every slot assigned; every live
        replica's link to its master up."""
        deadline = time.monotonic() + max(1.0, timeout_s)
        alive = [n for n in self.nodes if n.alive]
        while True:
            problems = []
            for node in alive:
                info = _info(node.port, "CLUSTER", "INFO")
                if info.get("cluster_state") != "ok" \
                        or info.get("cluster_slots_ok") != "16384" \
                        or int(info.get("cluster_known_nodes", 0)) < len(alive):
                    problems.append(f"{node.port}: {info.get('cluster_state')}")
                    continue
                repl = _info(node.port, "INFO", "replication")
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    problems.append(f"{node.port}: replica link {repl.get('master_link_status')}")
            if not problems:
                return
            if time.monotonic() > deadline:
                raise ClusterStartError("cluster not healthy: " + "; ".join(problems))
            time.sleep(0.2)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        for node in self.nodes:
            if node.proxy is not None:
                node.proxy.stop()
        if self._own_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # ---- the proxies (stall_proxies=True) ---------------------------------------------
    def stall(self) -> None:
        """Every node's proxy stops forwarding (bytes wait; nothing is closed)."""
        for node in self.nodes:
            node.proxy.stall()

    def resume(self) -> None:
        for node in self.nodes:
            node.proxy.resume()

    # ---- facts ------------------------------------------------------------------------
    @property
    def seed_url(self) -> str:
        """The first node as clients reach it (through its proxy, with stall_proxies)."""
        return f"redis://{HOST}:{self.nodes[0].announced_port}"

    def node_at(self, port: int) -> Node:
        """The node of a port as CLUSTER NODES names it (its own or its proxy's)."""
        return next(n for n in self.nodes if port in (n.port, n.announced_port))

    def url_of(self, node: Node) -> str:
        return f"redis://{HOST}:{node.port}"

    def role(self, node: Node) -> str:
        return _info(node.port, "INFO", "replication").get("role", "unknown")

    def master_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.alive and self.role(n) == "master"]

    def node_of_slot(self, slot: int) -> Node:
        """The node serving ``slot`` now, as the first live node's CLUSTER NODES says."""
        for node in self.nodes:
            if not node.alive:
                continue
            for line in _command(node.port, "CLUSTER", "NODES").splitlines():
                parts = line.split()
                if len(parts) < 9 or "master" not in parts[2] or "fail" in parts[2]:
                    continue
                for spec in parts[8:]:
                    if spec.startswith("["):
                        continue
                    first, _, last = spec.partition("-")
                    if int(first) <= slot <= int(last or first):
                        port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                        return self.node_at(port)
            break
        raise ClusterStartError(f"no node serves slot {slot}")

    # ---- faults -----------------------------------------------------------------------
    def kill(self, node: Node) -> None:
        """kill -9 one node (its replica takes over after the node timeout)."""
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(10)

    def shutdown_nosave(self, node: Node, timeout_s: float = 60.0) -> None:
        """``SHUTDOWN NOSAVE``: the node keeps nothing (no persistence here). Redis 7 first
        waits (``shutdown-timeout``, 10 s) for its replicas to catch up, then exits."""
        try:
            _command(node.port, "SHUTDOWN", "NOSAVE", timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        if node.process is not None:
            try:
                node.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                raise ClusterStartError(f"redis-server on {node.port} did not shut down") \
                    from None

    def replica_of(self, master: Node) -> Node | None:
        """A live replica of ``master`` now (as that replica's INFO says)."""
        for node in self.nodes:
            if node is master or not node.alive:
                continue
            info = _info(node.port, "INFO", "replication")
            if info.get("role") == "slave" and \
                    int(info.get("master_port", 0) or 0) in (master.port, master.announced_port):
                return node
        return None

    def restart(self, node: Node, timeout_s: float = 60.0) -> None:
        """Start a killed node again with its nodes.conf: it rejoins (as a replica of the
        master that replaced it, or as the master again if no failover happened)."""
        self._spawn(node)
        self._wait_ping(node, time.monotonic() + timeout_s)

    def wait_promoted(self, killed: Node, slot: int, timeout_s: float = 60.0) -> Node:
        """Wait until another live node serves ``slot`` (the killed master's) and every
        live node reports ``cluster_state:ok``; return the new master."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                owner = self.node_of_slot(slot)
            except (ClusterStartError, StopIteration):
                owner = None
            if owner is not None and owner is not killed and owner.alive:
                alive = [n for n in self.nodes if n.alive]
                if all(_info(n.port, "CLUSTER", "INFO").get("cluster_state") == "ok"
                       for n in alive):
                    return owner
            time.sleep(0.2)
        raise ClusterStartError(f"no replica took over slot {slot} from {killed.port}")

    # ---- resharding -------------------------------------------------------------------
    def node_id(self, node: Node) -> str:
        return _command(node.port, "CLUSTER", "MYID").strip()

    def begin_move(self, slot: int, target: Node) -> Node:
        """Start migrating ``slot`` to ``target`` (IMPORTING/MIGRATING), moving no key yet:
        the source answers ASK for keys it no longer has. Returns the source node."""
        source = self.node_of_slot(slot)
        _command(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING",
                 self.node_id(source))
        _command(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING",
                 self.node_id(target))
        return source

    def migrate_keys(self, slot: int, source: Node, target: Node) -> int:
        """MIGRATE every key of ``slot`` from ``source`` to ``target``; how many moved."""
        moved = 0
        while True:
            keys = _command(source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
            if not keys:
                return moved
            out = _command(source.port, "MIGRATE", HOST, str(target.port), "", "0", "5000",
                           "REPLACE", "KEYS", *keys)
            if "OK" not in out and "NOKEY" not in out:
                raise ClusterStartError(f"MIGRATE failed: {out}")
            moved += len(keys)

    def end_move(self, slot: int, target: Node) -> None:
        """Give ``slot`` to ``target`` on every master (the move is done)."""
        target_id = self.node_id(target)
        for node in [target, *(n for n in self.master_nodes() if n is not target)]:
            _command(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)

    def move_slot(self, slot: int, target: Node) -> int:
        """Reshard one slot to ``target`` with its keys (as ``redis-cli --cluster
        reshard`` does, one slot); the number of keys moved."""
        source = self.begin_move(slot, target)
        if source is target:
            return 0
        moved = self.migrate_keys(slot, source, target)
        self.end_move(slot, target)
        return moved


def kill_leftovers(base_dir: Path) -> int:
    """kill -9 every node a LocalCluster under ``base_dir`` left running (its pid files:
    a process that owned the cluster was itself killed); how many were killed."""
    killed = 0
    for pid_file in Path(base_dir).glob("*/redis.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"redis-server" in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def main(argv: list[str] | None = None) -> int:
    """``python -m slotguard.local_cluster [--masters N] [--replicas R]``: start a cluster,
    print its seed URL, keep it until SIGINT/SIGTERM (benchmarks, trying things)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m slotguard.local_cluster")
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args(argv)
    if args.masters < 1 or args.replicas < 0:
        parser.error("--masters must be >= 1 and --replicas >= 0")
    cluster = LocalCluster(masters=args.masters, replicas=args.replicas).start()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        print(cluster.seed_url, flush=True)
        while not stopping:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
