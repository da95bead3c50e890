"""The command line that starts `dsmoe` on one or several processes or nodes: the workflow's and the tests'.

    one process            dsmoe ...
    N GPUs (FSDP)          accelerate launch --config_file FSDP_CONFIG --num_processes N --main_process_port 0 -m dsmoe.cli ...
    N CPU processes (DDP)  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N --main_process_port 0 -m dsmoe.cli ...
    M nodes x G GPUs       srun --nodes=M --ntasks-per-node=1 sh -c 'exec accelerate launch --config_file FSDP_CONFIG
                             --num_machines M --num_processes M*G --machine_rank $SLURM_NODEID --main_process_ip FIRST_NODE
                             --main_process_port 29500 --rdzv_backend c10d -m dsmoe.cli "$@"' dsmoe ...

On the CPU, accelerate 1.15 runs several processes only through torchrun's launcher (`--multi_gpu`;
`--cpu` alone needs mpirun) and only with ACCELERATE_USE_CPU set, which selects gloo; its FSDP
plugin is GPU-only (a CPU run with the FSDP config falls back to DDP), so the CPU line asks for DDP.
`--main_process_port 0` takes a free port: two jobs on one node do not collide.

Several nodes: inside one SLURM allocation (`--nodes=M`), `srun` starts one launcher per node; each
is torchrun (through accelerate) with a c10d rendezvous whose store lives on the allocation's first
node, so that every launcher finds the others and the ranks are numbered 0..M*G-1 across nodes. The
job step is the rule's own srun: the workflow marks a multi-node pretrain job `mpi` so that the
SLURM executor does not wrap it in an `srun -n1` of its own (workflow/rules/pretrain.smk).
"""

from pathlib import Path

FSDP_CONFIG = Path("workflow") / "accelerate" / "fsdp.yaml"  # relative to the repository root
RDZV_PORT = 29500  # the c10d store on the first node of a multi-node job (an allocation has its nodes to itself)
FIRST_NODE = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'


def node_launch(nodes, processes, machine_rank, host, port, fsdp_config=FSDP_CONFIG, cpu=False):
    """`accelerate launch` for one node of a multi-node job: `processes` in all, over `nodes` launchers.

    `cpu`: gloo processes on CPUs (DDP) instead of GPUs (FSDP): the tests' rendezvous on one machine."""
    if nodes < 2 or processes % nodes:
        raise ValueError(f"{processes} processes cannot be spread evenly over {nodes} nodes (need 2 or more nodes "
                         "and a multiple of their number)")
    head = "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu" if cpu else f"accelerate launch --config_file {fsdp_config}"
    return (f"{head} --num_machines {nodes} --num_processes {processes} --machine_rank {machine_rank}"
            f" --main_process_ip {host} --main_process_port {port} --rdzv_backend c10d --same_network -m dsmoe.cli")


def multi_node_prefix(nodes, gpus, fsdp_config=FSDP_CONFIG):
    """One launcher per node of the SLURM allocation, through `srun`; the rule's words follow as "$@"."""
    inner = node_launch(nodes, gpus, "$SLURM_NODEID", FIRST_NODE, RDZV_PORT, fsdp_config)
    return f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 sh -c 'exec {inner} \"$@\"' dsmoe"


def launch_prefix(gpus=0, cpu_processes=1, fsdp_config=FSDP_CONFIG, nodes=1):
    """The words before `train ...`: `dsmoe`, or `accelerate launch ... -m dsmoe.cli` for several processes."""
    gpus, cpu_processes, nodes = int(gpus or 0), int(cpu_processes or 1), int(nodes or 1)
    if nodes > 1:
        if gpus < nodes or gpus % nodes:
            raise ValueError(f"cluster.train_gpus={gpus} is not a multiple of cluster.train_nodes={nodes} "
                             "(every node runs the same number of GPUs)")
        return multi_node_prefix(nodes, gpus, fsdp_config)
    if gpus > 1:
        return f"accelerate launch --config_file {fsdp_config} --num_processes {gpus} --main_process_port 0 -m dsmoe.cli"
    if cpu_processes > 1:  # a rule's `gpu: 1` is only a label on a machine without a scheduler
        return (f"ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {cpu_processes}"
                " --main_process_port 0 -m dsmoe.cli")
    return "dsmoe"
