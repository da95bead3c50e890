"""`dsmoe plan`: what a run will cost before it is launched, and whether the profile's requests fit it.

Per job kind and in total: FLOPs, GPU-hours at a stated model FLOPs utilisation (MFU), GPU memory per
device, host memory, checkpoint size and the disk the kept checkpoints and models take. Shapes come
from MODEL_SHAPES (no download) or from the config's random_init. The arithmetic, all stated:

  params N        L(2d² + 2d·kv + 3dD + 2d) + d + V·d (+ V·d untied lm_head); the DSMoE gates (L(dn + n²),
                  < 0.03%) are left out. Training computes every expert (masked), as the dense model.
  FLOPs/token     training 6·M + 12·L·s·d, M = N (tied) or N - V·d (untied): the matmul
                  weights, lm_head included (its product is computed; the embedding lookup is not) [Kaplan et al. 2020, with the attention term]; eval 2·M + 4·L·s·d
  GPU memory      training 16 B/param (fp32 weights, fp32 grads, AdamW m and v) / G under FSDP (G GPUs),
                  + activations of one micro-batch b: L·s·b·(16d + 6D) B (bf16, flash attention) +
                  s·b·V·8 B (fp32 logits and their gradient); eval: 2 B/param (bf16) + one batch of logits
  host memory     the main process alone loads the model in fp32 (4·N B; the others start on the meta
                  device: fsdp_cpu_ram_efficient_loading in workflow/accelerate/fsdp.yaml), + 8 GB,
                  + 2 GB per process on the node (CUDA context, pinned batches)
  checkpoint      12 B/param (fp32 weights + AdamW state; accelerate save_state), keep_checkpoints kept;
                  final model and each milestone model 2 B/param (bf16) or 4 (float32)
"""

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .names import DENSE, DENSE_CONTINUED, FIXED_ROUTING, SWEEPS, prune_method

# name -> (hidden d, intermediate D, layers, heads, kv heads, vocab, tied embeddings)
MODEL_SHAPES = {
    "meta-llama/Llama-3.2-1B": (2048, 8192, 16, 32, 8, 128256, True),
    "meta-llama/Llama-2-7b-hf": (4096, 11008, 32, 32, 32, 32000, False),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
}
# name -> (dense bf16 peak FLOP/s, memory GB)
GPUS = {"h100": (989e12, 80), "h200": (989e12, 141), "a100": (312e12, 80), "a100-40gb": (312e12, 40),
        "l40s": (362e12, 48), "v100": (125e12, 32)}
GPUS_PER_NODE = 8
HOST_OVERHEAD_GB = 8
HOST_PER_PROCESS_GB = 2
PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "default" / "config.yaml"
GB = 1e9


@dataclass
class Shape:
    d: int
    D: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def params(self):
        kv = self.d // self.heads * self.kv_heads
        per_layer = 2 * self.d * self.d + 2 * self.d * kv + 3 * self.d * self.D + 2 * self.d
        return self.layers * per_layer + self.d + self.vocab * self.d * (1 if self.tied else 2)

    @property
    def matmul_params(self):
        return self.params if self.tied else self.params - self.vocab * self.d  # no product for the input embedding

    def train_flops_per_token(self, seq_len):
        return 6 * self.matmul_params + 12 * self.layers * seq_len * self.d

    def eval_flops_per_token(self, seq_len):
        return 2 * self.matmul_params + 4 * self.layers * seq_len * self.d

    def activation_bytes(self, seq_len, micro_batch):
        return self.layers * seq_len * micro_batch * (16 * self.d + 6 * self.D) + seq_len * micro_batch * self.vocab * 8


def model_shape(config):
    """The dense shape of the run's base model: MODEL_SHAPES or random_init (vocab from the tokenizer's model)."""
    name = config["base_model"]
    if config.get("random_init"):
        init = config["random_init"]
        base = MODEL_SHAPES.get(name)
        vocab = init.get("vocab_size", base[5] if base else None)
        if vocab is None:
            raise ValueError(f"random_init without vocab_size and base_model {name!r} not in dsmoe.plan.MODEL_SHAPES")
        return Shape(init["hidden_size"], init["intermediate_size"], init["num_hidden_layers"], init["num_attention_heads"],
                     init.get("num_key_value_heads", init["num_attention_heads"]), vocab, True)
    if name not in MODEL_SHAPES:
        raise ValueError(f"no shape for base_model {name!r}: dsmoe plan knows {', '.join(MODEL_SHAPES)} "
                         "(add it to dsmoe.plan.MODEL_SHAPES)")
    return Shape(*MODEL_SHAPES[name])


@dataclass
class Job:
    rule: str
    count: int  # jobs of this kind
    gpus: int  # per job
    flops: float  # per job
    gpu_mem_gb: float  # per device
    host_mem_gb: float  # per node
    disk_gb: float  # per job, kept at the end
    checkpoint_gb: float = 0.0


def trained_models(config):
    names = list(config["variants"]) + ([DENSE_CONTINUED] if config["dense_continued"] else [])
    return names + [prune_method(kind) for kind in config["baselines"]["prune"]]


def eval_tokens(config):
    """Tokens one perplexity pass reads: validation sequences (capped) x sources x seq_len."""
    cap = config["eval"]["ppl_max_sequences"]
    per_source = config["data"]["val_sequences"] if cap is None else min(cap, config["data"]["val_sequences"])
    return per_source * len(config["data"]["sources"] or [None]) * config["data"]["seq_len"]


def jobs(config, gpus):
    shape, tc, seq = model_shape(config), config["train"], config["data"]["seq_len"]
    n, weight_bytes = shape.params, 4 if config["dtype"] == "float32" else 2
    nodes = max(1, math.ceil(gpus / GPUS_PER_NODE))
    per_process_batch = tc["batch_size"] // gpus if tc["batch_size"] >= gpus else 1
    micro = min(tc["micro_batch_size"], per_process_batch)
    state = 16 * n / gpus if gpus > 1 else 16 * n
    train_mem = (state + shape.activation_bytes(seq, micro)) / GB
    host = 4 * n / GB + HOST_OVERHEAD_GB + HOST_PER_PROCESS_GB * min(gpus, GPUS_PER_NODE)
    checkpoint = 12 * n / GB
    milestones = len(config["eval"]["milestone_tokens"]) if "dsmoe" in config["variants"] else 0
    trained = trained_models(config)
    disk = tc["keep_checkpoints"] * checkpoint + weight_bytes * n / GB
    evaluated = 1 + len(trained)
    eval_mem = (weight_bytes * n + config["eval"]["batch_size"] * seq * shape.vocab * 4) / GB
    eval_flops = eval_tokens(config) * shape.eval_flops_per_token(seq)
    eval_host = 4 * n / GB + HOST_OVERHEAD_GB
    swept = [len(config["eval"][grid]) for _, (variant, grid, _) in SWEEPS.items() if variant in config["variants"]]
    out = [Job("pretrain", len(trained), gpus, tc["tokens"] * shape.train_flops_per_token(seq), train_mem, host, disk,
               checkpoint),
           Job("eval_ppl", evaluated, 1, eval_flops, eval_mem, eval_host, 0.0)]
    out += [Job("tau_sweep", 1, 1, taus * eval_flops, eval_mem, eval_host, 0.0) for taus in swept]
    if milestones:
        out.append(Job("eval_milestones", 1, 1, (milestones + 1) * eval_flops, eval_mem, eval_host,
                       milestones * weight_bytes * n / GB))
    return out, nodes


def profile_resources(config, profile=PROFILE):
    """Each rule's requests: the workflow profile's, and rule pretrain's from config `cluster`."""
    requests = yaml.safe_load(Path(profile).read_text()).get("set-resources", {}) if Path(profile).is_file() else {}
    cluster = config["cluster"]
    requests["pretrain"] = {**requests.get("pretrain", {}), "gpu": cluster["train_gpus"], "nodes": cluster["train_nodes"],
                            "mem_mb": cluster["train_mem_mb"], "runtime": cluster["train_runtime"]}
    return requests


def check_fit(job, request, gpu_gb, mfu_flops, max_jobs):
    """Warnings (strings naming the rule) where the job does not fit what the profile requests."""
    warnings = []
    if job.gpus and job.gpu_mem_gb > gpu_gb:
        warnings.append(f"{job.rule}: needs {job.gpu_mem_gb:.1f} GB per GPU, the GPU has {gpu_gb}")
    if "gpu" not in request and "gres" not in request:
        warnings.append(f"{job.rule}: the profile requests no GPU")
    nodes = request.get("nodes", 1)
    if "mem_mb" in request and job.host_mem_gb > request["mem_mb"] / 1000:
        warnings.append(f"{job.rule}: needs {job.host_mem_gb:.0f} GB of host memory per node, the profile asks "
                        f"{request['mem_mb'] / 1000:.0f} GB (mem_mb)")
    if "runtime" in request:
        hours = job.flops / (mfu_flops * job.gpus) / 3600
        jobs_needed = math.ceil(hours * 60 / request["runtime"]) if hours else 1
        if jobs_needed > max_jobs:
            warnings.append(f"{job.rule}: {hours:.1f} h of wall time, {jobs_needed} jobs of runtime {request['runtime']} "
                            f"min; at most {max_jobs} {'(cluster.max_resubmits + 1)' if max_jobs > 1 else ''}")
    return warnings, nodes


def plan(config, gpus=None, gpu="h100", mfu=0.4, profile=PROFILE):
    """`(rows, totals, warnings)` of a validated run config; `gpus` per pretrain job (default: config's)."""
    if gpu not in GPUS:
        raise ValueError(f"unknown --gpu {gpu!r}: one of {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu} is not in (0, 1]")
    gpus = int(gpus or config["cluster"]["train_gpus"])
    if gpus < 1 or (gpus > GPUS_PER_NODE and gpus % GPUS_PER_NODE):
        raise ValueError(f"--gpus {gpus}: 1 to {GPUS_PER_NODE} on one node, or a multiple of {GPUS_PER_NODE}")
    peak, gpu_gb = GPUS[gpu]
    requests = profile_resources(config, profile)
    if gpus != config["cluster"]["train_gpus"]:
        requests["pretrain"].update(gpu=gpus, nodes=max(1, gpus // GPUS_PER_NODE))
    rows, warnings = [], []
    found, nodes = jobs(config, gpus)
    for job in found:
        retries = config["cluster"]["max_resubmits"] + 1 if job.rule == "pretrain" else 1
        warned, _ = check_fit(job, requests.get(job.rule, {}), gpu_gb, peak * mfu, retries)
        warnings += warned
        gpu_hours = job.flops / (peak * mfu) / 3600
        rows.append({"rule": job.rule, "jobs": job.count, "gpus": job.gpus, "flops": job.flops, "gpu_hours": gpu_hours,
                     "wall_hours": gpu_hours / job.gpus, "gpu_mem_gb": job.gpu_mem_gb, "host_mem_gb": job.host_mem_gb,
                     "checkpoint_gb": job.checkpoint_gb, "disk_gb": job.disk_gb})
    totals = {"flops": sum(r["flops"] * r["jobs"] for r in rows), "gpu_hours": sum(r["gpu_hours"] * r["jobs"] for r in rows),
              "disk_gb": sum(r["disk_gb"] * r["jobs"] for r in rows)}
    return rows, totals, warnings


def format_plan(config, rows, totals, warnings, gpu, mfu):
    shape = model_shape(config)
    lines = [f"run {config['run_name']}: {config['base_model']}, {shape.params / 1e9:.3f}B params, "
             f"{shape.train_flops_per_token(config['data']['seq_len']) / 1e9:.2f} GFLOP/token trained; "
             f"{gpu} at {mfu:.0%} MFU ({GPUS[gpu][0] / 1e12:.0f} TFLOP/s bf16 peak, {GPUS[gpu][1]} GB)",
             f"{'rule':<16}{'jobs':>5}{'GPUs':>5}{'FLOPs/job':>11}{'GPU-h/job':>11}{'wall h/job':>11}"
             f"{'GPU mem GB':>11}{'host GB':>9}{'ckpt GB':>9}{'disk GB/job':>12}"]
    for r in rows:
        lines.append(f"{r['rule']:<16}{r['jobs']:>5}{r['gpus']:>5}{r['flops']:>11.2e}{r['gpu_hours']:>11.1f}"
                     f"{r['wall_hours']:>11.1f}{r['gpu_mem_gb']:>11.1f}{r['host_mem_gb']:>9.0f}{r['checkpoint_gb']:>9.1f}"
                     f"{r['disk_gb']:>12.1f}")
    lines.append(f"total: {totals['flops']:.2e} FLOPs, {totals['gpu_hours']:,.0f} GPU-hours, {totals['disk_gb']:,.0f} GB "
                 "of checkpoints and models kept (lm_eval, prune, drop_sweep, data not estimated)")
    lines += [f"WARNING {w}" for w in warnings] or ["every estimated job fits what the profile requests"]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI: dsmoe plan


def register(subparsers):
    p = subparsers.add_parser("plan", help="FLOPs, GPU-hours, memory and disk of a run before launch; checks the profile")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per pretrain job (default: the config's cluster.train_gpus)")
    p.add_argument("--gpu", default=None, help=f"GPU kind: {', '.join(GPUS)} (default: cluster.gpu_model, else h100)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed (default 0.4)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args):
    from .config import load_config

    config = load_config(args.config)
    gpu = args.gpu or config["cluster"]["gpu_model"] or "h100"
    rows, totals, warnings = plan(config, args.gpus, gpu, args.mfu)
    print(format_plan(config, rows, totals, warnings, gpu, args.mfu))
