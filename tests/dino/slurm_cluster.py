"""A real one-node SLURM cluster for the tests: munged + slurmctld + slurmd in a temporary folder.

Needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them); :func:`missing` says what is
absent so that a developer's ``make test`` can skip with that reason. Everything lives under the
given folder (config, state, sockets, logs) and runs on free ports, so it touches no system
service. ``JobRequeue=1``; the node has this machine's CPUs and memory; job credentials expire after
:data:`CRED_EXPIRE_S`, which is how long a requeued job waits before it restarts.
"""
import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
# A requeued job waits this long in PENDING (BeginTime): its old job credential must expire first, or
# slurmd refuses the launch ("Job credential revoked"). SLURM's default is 120 s.
CRED_EXPIRE_S = 10
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel")


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)


def missing() -> List[str]:
    return [n for n in DAEMONS + CLIENTS if _which(n) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_resources():
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
    return int(fields.get("CPUs", os.cpu_count() or 1)), int(fields.get("RealMemory", 1024))


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`env` is for client commands."""

    def __init__(self, root):
        self.root = Path(root)
        self.procs: Dict[str, subprocess.Popen] = {}
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        user = getpass.getuser()
        cpus, mem = _node_resources()
        for d in ("state", "spool", "munge", "logs"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o755)  # clients need to reach the socket
        r = self.root
        self.conf.write_text(f"""\
ClusterName=ci
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge' / 'munge.socket'},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'logs' / 'slurmctld.log'}
SlurmdLogFile={r / 'logs' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
JobRequeue=1
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=ci Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def _spawn(self, name: str, args: List[str]) -> None:
        log = open(self.root / "logs" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen([_which(name)] + args, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", ["-F", "-f", f"--key-file={key}", f"--socket={m / 'munge.socket'}",
                               f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                               f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: (m / "munge.socket").exists(), 20, "munged's socket")
        self._spawn("slurmctld", ["-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["-D", "-f", str(self.conf), "-N", self.host])
        self.wait_node_idle(timeout)
        return self

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}; logs in {self.root / 'logs'}:\n"
                                   + self.logs())
            if predicate():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}; logs:\n" + self.logs())

    def _node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=30) \
            if shutil.which("sinfo") else self.scontrol("show", "node", self.host, check=False)
        return "idle" in r.stdout.lower()

    def wait_node_idle(self, timeout: float = 60) -> None:
        self._wait(self._node_idle, timeout, f"node {self.host} to be idle")

    def scontrol(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30, check=check)

    def job_field(self, job_id: str, field: str) -> str:
        out = self.scontrol("show", "job", str(job_id), check=False).stdout
        for tok in out.split():
            if tok.startswith(field + "="):
                return tok.split("=", 1)[1]
        return ""

    def logs(self, tail: int = 3000) -> str:
        texts = []
        for p in sorted((self.root / "logs").glob("*")):
            texts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(texts)

    def stop(self) -> None:
        for name in reversed(DAEMONS):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
