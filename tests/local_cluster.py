"""A multi-node Ray cluster on this one machine, from `ray start` processes, for the cluster tests.

Every node is its own `ray start --block` process group on loopback, with its own temp dir,
ports (workers on random ports) and object store, so a node can be lost on its own: `kill`
SIGKILLs its processes at once, as if its machine went away (no raylet says goodbye; the
GCS finds out through its health checks). Nodes are named (`--node-name`), so the state API
tells which node ran what. The head runs the dashboard, hence the job server behind
`ray job submit`. Token auth, as in test_deploy.py: `env` carries the token for clients.

Nothing here calls `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

OBJECT_STORE_BYTES = 200 * 1024 * 1024  # per node: small, the machine is shared


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_processes(proc: subprocess.Popen, temp_dir: str) -> list[psutil.Process]:
    """A node's processes: those whose command line names its temp dir, and their children."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid not in (os.getpid(), proc.pid) and temp_dir in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    return list(found.values())


def _sigkill(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def stop_node(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop one node for good: SIGTERM its `ray start --block` (which stops its processes if
    they let it), then SIGKILL whatever of it is left."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass  # raylet and gcs_server can take many seconds after a job: kill them
    _sigkill(node_processes(proc, temp_dir))
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=10)


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: str
    resources: dict[str, float] = field(default_factory=dict)


class LocalCluster:
    def __init__(self, extra_env: dict[str, str] | None = None):
        self.bin_dir = Path(sys.executable).parent
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "REDIS_URL"}
        env.update(PATH=f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        env.update(extra_env or {})
        self.env = env
        self.nodes: dict[str, Node] = {}
        self.gcs_port = self.dashboard_port = 0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], num_cpus: float, resources: dict[str, float]) -> Node:
        temp_dir = tempfile.mkdtemp(prefix="qtc-", dir="/tmp")  # short: Ray's socket paths are capped
        agent, metrics, rt_agent = free_ports(3)
        log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - the child keeps it
        cmd = [str(self.bin_dir / "ray"), "start", "--block", *args, f"--node-name={name}",
               f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
               f"--object-store-memory={OBJECT_STORE_BYTES}", "--node-ip-address=127.0.0.1",
               f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={rt_agent}", "--min-worker-port=0", "--max-worker-port=0",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=temp_dir)
        log.close()
        node = self.nodes[name] = Node(name, proc, temp_dir, dict(resources))
        return node

    def start_head(self, num_cpus: float = 1, resources: dict[str, float] | None = None) -> Node:
        self.gcs_port, self.dashboard_port, client = free_ports(3)
        node = self._start("head", ["--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                                    f"--ray-client-server-port={client}", "--include-dashboard=true",
                                    "--dashboard-host=127.0.0.1"], num_cpus, resources or {})
        self._wait(lambda: self._dashboard_up(), node, "the Ray dashboard did not come up")
        self.wait_alive("head")
        return node

    def add_node(self, name: str, num_cpus: float, resources: dict[str, float]) -> Node:
        node = self._start(name, [f"--address=127.0.0.1:{self.gcs_port}"], num_cpus, resources)
        self.wait_alive(name)
        return node

    def kill(self, name: str) -> None:
        """Lose a node: SIGKILL its whole process tree at once (its `ray start` too, so nothing
        cleans up after it)."""
        node = self.nodes[name]
        procs = node_processes(node.proc, node.temp_dir)
        procs.append(psutil.Process(node.proc.pid))
        _sigkill(procs)
        node.proc.wait(timeout=10)

    def shutdown(self) -> None:
        for name in reversed(list(self.nodes)):  # workers first, the head last
            node = self.nodes.pop(name)
            stop_node(node.proc, node.temp_dir)
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    # ---- state ----
    def _state(self, resource: str) -> list:
        """Ray's state API through the dashboard, this cluster's token in the header (Ray's
        own token loader would read the process environment once and keep it)."""
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(address=self.dashboard, headers={
            "Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}", "Content-Type": "application/json"})
        return client.list(StateResource(resource), options=ListApiOptions(detail=True, limit=10_000),
                           raise_on_missing_output=False)

    def list_nodes(self) -> list:
        return self._state("nodes")

    def list_actors(self) -> list:
        return self._state("actors")

    def node_ids(self) -> dict[str, dict[str, str]]:
        """node name -> {node id: state}, every node the GCS knows (dead ones too)."""
        out: dict[str, dict[str, str]] = {}
        for n in self.list_nodes():
            out.setdefault(n["node_name"], {})[n["node_id"]] = n["state"]
        return out

    def alive_id(self, name: str) -> str | None:
        return next((i for i, s in self.node_ids().get(name, {}).items() if s == "ALIVE"), None)

    def wait_alive(self, name: str, timeout: float = 120) -> str:
        self._wait(lambda: self.alive_id(name) is not None, self.nodes[name], f"node {name} did not join")
        return self.alive_id(name)

    def wait_dead(self, node_id: str, timeout: float = 120) -> None:
        def dead() -> bool:
            return any(n["node_id"] == node_id and n["state"] == "DEAD" for n in self.list_nodes())

        deadline = time.monotonic() + timeout
        while not dead():
            assert time.monotonic() < deadline, f"node {node_id} was not declared dead"
            time.sleep(0.5)

    def _dashboard_up(self) -> bool:
        import httpx

        try:
            r = httpx.get(f"{self.dashboard}/api/version", timeout=2,
                          headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def _wait(self, predicate, node: Node, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if node.proc.poll() is not None:
                log = (Path(node.temp_dir) / "ray-start.log").read_text()[-2000:]
                raise RuntimeError(f"ray start ({node.name}) exited {node.proc.returncode}: {log}")
            try:
                if predicate():
                    return
            except Exception:  # noqa: BLE001, S110 - the state API answers errors while the head starts
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            time.sleep(0.5)
