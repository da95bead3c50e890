"""The command line that starts `dsmoe` on one or several processes: the workflow's and the tests'.

    one process            dsmoe ...
    N GPUs (FSDP)          accelerate launch --config_file FSDP_CONFIG --num_processes N --main_process_port 0 -m dsmoe.cli ...
    N CPU processes (DDP)  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N --main_process_port 0 -m dsmoe.cli ...

On the CPU, accelerate 1.15 runs several processes only through torchrun's launcher (`--multi_gpu`;
`--cpu` alone needs mpirun) and only with ACCELERATE_USE_CPU set, which selects gloo; its FSDP
plugin is GPU-only (a CPU run with the FSDP config falls back to DDP), so the CPU line asks for DDP.
`--main_process_port 0` takes a free port: two jobs on one node do not collide.
"""

from pathlib import Path

FSDP_CONFIG = Path("workflow") / "accelerate" / "fsdp.yaml"  # relative to the repository root


def launch_prefix(gpus=0, cpu_processes=1, fsdp_config=FSDP_CONFIG):
    """The words before `train ...`: `dsmoe`, or `accelerate launch ... -m dsmoe.cli` for several processes."""
    gpus, cpu_processes = int(gpus or 0), int(cpu_processes or 1)
    if gpus > 1:
        return f"accelerate launch --config_file {fsdp_config} --num_processes {gpus} --main_process_port 0 -m dsmoe.cli"
    if cpu_processes > 1:
        if gpus:
            raise ValueError(f"a job holds {gpus} GPU and asks for {cpu_processes} CPU processes: choose one")
        return (f"ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {cpu_processes}"
                " --main_process_port 0 -m dsmoe.cli")
    return "dsmoe"
