"""Ray's fake multi-node autoscaler, started and stopped without touching any other Ray on the machine.

``ray.cluster_utils.AutoscalingCluster`` cannot be used here: the pip wheel lacks its template
(``fake_multi_node/example.yaml``) and it runs ``ray stop --force``, which ends every Ray on the machine
(other tests', other users'). This harness writes the cluster config itself, starts the head with
``ray start --head --block --autoscaling-config=...`` in a session of its own, with its own temp dir and its
own ports (the fake provider launches its worker nodes from the autoscaler monitor, in the head's session,
against the ``gcs_address`` written in the config), and stops only the processes of that session and those
whose command line names its temp dir.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HEAD_TYPE = "ray.head.default"


def free_ports(n: int) -> list[int]:
    socks, out = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            out.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return out


class FakeAutoscalingCluster:
    """A head with ``head_cpus`` CPUs and no GPU, and ``worker_types`` (name -> {"resources": {...},
    "min_workers": .., "max_workers": ..}) for the fake provider to launch as local Ray nodes."""

    def __init__(self, head_cpus: int, worker_types: dict, idle_timeout_minutes: float = 0.5,
                 upscaling_speed: float = 1.0, env: dict | None = None):
        self.head_cpus = head_cpus
        self.worker_types = worker_types
        self.idle_timeout_minutes = idle_timeout_minutes
        self.upscaling_speed = upscaling_speed
        self.proc: subprocess.Popen | None = None
        self.tmp: str | None = None
        self.address: str | None = None
        self.extra_env = dict(env or {})
        self.env: dict = {}

    # -- start ---------------------------------------------------------------------------------------
    def config(self, gcs_address: str) -> dict:
        types = {HEAD_TYPE: {"resources": {"CPU": self.head_cpus, "GPU": 0}, "node_config": {}, "max_workers": 0}}
        for name, t in self.worker_types.items():
            types[name] = {"node_config": {}, **t}
        provider = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                    "disable_launch_config_check": True, "gcs_address": gcs_address}
        return {
            "cluster_name": "kbatch-fake",
            "max_workers": sum(t.get("max_workers", 0) for t in self.worker_types.values()),
            "upscaling_speed": self.upscaling_speed,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "docker": {},
            "provider": provider,
            "auth": {"ssh_user": "ubuntu"},
            "available_node_types": types,
            "head_node_type": HEAD_TYPE,
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }

    def start(self, timeout: float = 90.0) -> str:
        """Starts the head; returns the GCS address (``host:port``) once a driver can connect."""
        self.tmp = tempfile.mkdtemp(prefix="kbas-", dir="/tmp")  # short: Ray's socket paths have a length limit
        (gcs, nm, om, client, agent, agent_grpc, metrics, rtenv, dash) = free_ports(9)
        ip = "127.0.0.1"
        self.address = f"{ip}:{gcs}"
        cfg_file = os.path.join(self.tmp, "autoscaler.json")
        with open(cfg_file, "w") as f:
            json.dump(self.config(self.address), f)
        self.env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": self.tmp}
        self.env.update(self.extra_env)
        self.env.pop("RAY_ADDRESS", None)
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
               f"--autoscaling-config={cfg_file}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
               f"--node-ip-address={ip}", f"--port={gcs}", f"--node-manager-port={nm}",
               f"--object-manager-port={om}", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rtenv}",
               f"--dashboard-port={dash}", "--include-dashboard=false", f"--temp-dir={self.tmp}",
               "--object-store-memory=200000000", "--disable-usage-stats"]
        if not os.path.exists(cmd[0]):
            cmd[0] = shutil.which("ray") or "ray"
        self.log = open(os.path.join(self.tmp, "ray_start.log"), "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.start_log()}")
            if self._ready():
                return self.address
            time.sleep(1.0)
        raise RuntimeError(f"the fake autoscaling cluster did not start in {timeout:.0f} s: {self.start_log()}")

    def start_log(self) -> str:
        try:
            with open(os.path.join(self.tmp, "ray_start.log")) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def _ready(self) -> bool:
        try:
            out = self.python("import ray, json; ray.init(address=%r, log_to_driver=False); "
                              "print(json.dumps(len([n for n in ray.nodes() if n['Alive']])))" % self.address,
                              timeout=30)
            return int(out.strip().splitlines()[-1]) >= 1
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def python(self, code: str, timeout: float = 60) -> str:
        """Runs ``code`` in a fresh Python against this cluster (the test process may hold another Ray)."""
        r = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode:
            raise RuntimeError(f"python exited {r.returncode}: {r.stderr[-2000:]}")
        return r.stdout

    # -- stop ----------------------------------------------------------------------------------------
    def pids(self) -> list[int]:
        """Our processes: those of the head's session, and any whose command line names our temp dir."""
        if self.proc is None:
            return []
        sid, out = self.proc.pid, []
        for p in os.listdir("/proc"):
            if not p.isdigit() or int(p) == os.getpid():
                continue
            pid = int(p)
            try:
                if os.getsid(pid) == sid:
                    out.append(pid)
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if self.tmp and self.tmp.encode() in f.read():
                        out.append(pid)
            except (OSError, ProcessLookupError):
                continue
        return out

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.2)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.proc = None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
