"""A real three-node Redis Cluster on loopback for the cluster tier's tests (no replicas, no persistence)."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

NO_CLUSTER = "redis-server / redis-cli are not installed (apt-get install -y redis-server); the cluster tests need them"


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(n: int) -> list[int]:
    """n free ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(20000, 55000)
        if port not in ports and _bindable(port) and _bindable(port + 10000):
            ports.append(port)
    return ports


class RedisClusterServers:
    """Three ``redis-server --cluster-enabled yes`` processes joined by ``redis-cli --cluster create``.

    ``cluster-require-full-coverage no``: when a node is lost the others keep serving their own slots (what
    a cache cluster wants). ``cluster-node-timeout`` is short so a lost node is marked failed quickly.
    """

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            pytest.skip(NO_CLUSTER)
        self.server, self.cli, self.workdir = server, cli, workdir
        self.ports = cluster_ports(nodes)
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> RedisClusterServers:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for port in self.ports:
            args = [
                self.server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                "1500",
                "--cluster-require-full-coverage",
                "no",
                "--maxmemory-policy",
                "allkeys-lru",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ]
            self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.ports:
            self._wait(lambda port=port: self._cli(port, "ping") == "PONG", f"redis-server on port {port}")
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        create = subprocess.run(
            [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if create.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        for port in self.ports:
            self._wait(
                lambda port=port: "cluster_state:ok" in self._cli(port, "cluster", "info"),
                f"cluster state ok on port {port}",
            )
        return self

    def kill(self, port: int) -> None:
        """SIGKILL one node (no chance to hand its slots over)."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)

    def _cli(self, port: int, *args: str) -> str:
        out = subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    @staticmethod
    def _wait(check, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.05)
