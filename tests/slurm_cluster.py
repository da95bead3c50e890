"""A throwaway single-node SLURM cluster for tests: munged, slurmctld and slurmd on this machine.

`start_cluster(workdir)` installs Debian's slurmctld, slurmd, slurm-client and munge when they
are missing (root only), writes a slurm.conf for this node under `workdir`, starts the daemons and
waits until the node is idle. It returns a `Cluster` whose `env` points SLURM_CONF at that file and
whose `stop()` ends only the daemons it started. Raises `SlurmUnavailable` with the reason when no
cluster can be had.

The node advertises what a GPU node of the workflow profile offers, so that the profile's requests
are submitted as they are and accepted: `gpus` GPUs (GRES `gpu`), at least `cpus` CPUs and
`memory_mb` of memory. SLURM 22.05's gres/gpu plugin drops a GPU without a device file ("Removing
file-less GPU", then the node is INVAL: "gres/gpu count reported lower than configured"), so each
stand-in GPU is a character device (1:3, what /dev/null is) made with mknod under the cluster's
directory, listed in a gres.conf beside slurm.conf (AutoDetect=off). A job that gets GPUs sees
CUDA_VISIBLE_DEVICES and runs on the CPU. CPUs and memory beyond the machine's come from
`SlurmdParameters=config_overrides` (the node as configured, not as probed); memory is not a
consumable here (CR_Core), so jobs asking for more than the machine has still run.

The config is also linked at /etc/slurm/slurm.conf (removed again by `stop()`): the SLURM executor
plugin strips SLURM_CONF before the `srun` inside each job, which then reads the default path. An
existing /etc/slurm/slurm.conf (a real SLURM installation) is never touched: the cluster is refused.
"""

import os
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["slurmctld", "slurmd", "munged", "sbatch", "squeue", "sinfo"]
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")

SLURM_CONF = """\
ClusterName=dsmoe-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
SchedulerType=sched/backfill
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    pass


@dataclass
class Cluster:
    conf: Path
    pids: list = field(default_factory=list)
    linked_default: bool = False

    @property
    def env(self):
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def stop(self):
        for pid in reversed(self.pids):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        if self.linked_default and DEFAULT_CONF.is_symlink():
            DEFAULT_CONF.unlink()


def _run(cmd, **kwargs):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)


def ensure_installed():
    if all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed and installing {PACKAGES} needs root")
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "install", "-y", *PACKAGES], env=env, timeout=900)
    except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as err:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {getattr(err, 'stderr', err)}") from err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_pid(path, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.2)
    raise SlurmUnavailable(f"daemon did not write {path}")


def start_munge(state):
    """munged with a private socket; returns (pid, socket path)."""
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        _run(["/usr/sbin/mungekey", "--create", "--keyfile", str(key)])
    socket_path = state / "munge.socket"
    pidfile = state / "munged.pid"
    _run(["/usr/sbin/munged", "--force", f"--socket={socket_path}", f"--pid-file={pidfile}",
          f"--seed-file={state / 'munged.seed'}", f"--log-file={state / 'munged.log'}", f"--key-file={key}"])
    return _read_pid(pidfile), socket_path


def write_gres(state, host, gpus):
    """gres.conf beside slurm.conf (slurmd reads it from there) with `gpus` stand-in device files."""
    devices = state / "gpu-devices"
    devices.mkdir(exist_ok=True)
    for i in range(gpus):
        path = devices / f"gpu{i}"
        if not path.exists():
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (state / "gres.conf").write_text(f"AutoDetect=off\nNodeName={host} Name=gpu File={devices}/gpu[0-{gpus - 1}]\n")


def remove_stale_link():
    """Remove DEFAULT_CONF when it is the link of an earlier test cluster whose test was killed before its
    `stop()`: a link (never a real file) to a dsmoe-test config that is gone or whose slurmctld has ended.
    Its daemons, if any are left, are ended too. Anything else there is left alone."""
    if not DEFAULT_CONF.is_symlink():
        return
    target = Path(os.readlink(DEFAULT_CONF))
    if target.is_file() and "ClusterName=dsmoe-test" not in target.read_text():
        return
    pids = {}
    for name in ("slurmctld", "slurmd"):
        try:
            pids[name] = int((target.parent / f"{name}.pid").read_text())
        except (OSError, ValueError):
            pass
    if "slurmctld" in pids and _alive(pids["slurmctld"], "slurmctld"):
        return  # another test cluster is running: refused below
    for name, pid in pids.items():
        if _alive(pid, name):
            os.kill(pid, 15)
    DEFAULT_CONF.unlink()


def _alive(pid, name):
    try:
        return name in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False


def start_cluster(workdir, gpus=8, cpus=16, memory_mb=262144):
    """Start munged, slurmctld and slurmd for this node; return a `Cluster` (call `.stop()`).

    The node offers `gpus` stand-in GPUs, max(`cpus`, this machine's) CPUs, `memory_mb` MB."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmctld/slurmd as a test needs root")
    ensure_installed()
    remove_stale_link()
    if DEFAULT_CONF.exists() or DEFAULT_CONF.is_symlink():
        raise SlurmUnavailable(f"{DEFAULT_CONF} exists: this machine has its own SLURM; not starting a test cluster")
    state = Path(workdir).resolve()
    for sub in ("ctld", "d"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    cpus = max(cpus, os.cpu_count())
    conf = state / "slurm.conf"
    cluster = Cluster(conf)
    try:
        munge_pid, munge_socket = start_munge(state)
        cluster.pids.append(munge_pid)
        # SLURM's auth/munge plugin finds munged through this option; default is /run/munge
        write_gres(state, host, gpus)
        conf.write_text(SLURM_CONF.format(host=host, state=state, cpus=cpus, memory=memory_mb, gpus=gpus,
                                          ctld_port=_free_port(), d_port=_free_port())
                        + f"AuthInfo=socket={munge_socket}\n")
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.symlink_to(conf)
        cluster.linked_default = True
        env = cluster.env
        _run(["/usr/sbin/slurmctld", "-f", str(conf)], env=env)
        cluster.pids.append(_read_pid(state / "slurmctld.pid"))
        _run(["/usr/sbin/slurmd", "-f", str(conf)], env=env)
        cluster.pids.append(_read_pid(state / "slurmd.pid"))
        wait_idle(cluster, host)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_idle(cluster, host, timeout=60):
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        result = subprocess.run(["sinfo", "-h", "-n", host, "-o", "%T"], capture_output=True, text=True, env=cluster.env)
        state = result.stdout.strip()
        if state.startswith("idle"):
            return
        if state.startswith(("down", "drain")):
            subprocess.run(["scontrol", "update", f"nodename={host}", "state=resume"], env=cluster.env, capture_output=True)
        time.sleep(1)
    log = (Path(cluster.conf).parent / "slurmd.log")
    tail = log.read_text()[-2000:] if log.is_file() else ""
    raise SlurmUnavailable(f"node {host} did not become idle (state {state!r}); slurmd.log:\n{tail}")
