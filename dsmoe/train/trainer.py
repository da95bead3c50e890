"""Continued pretraining (paper §4.3, §5.1-5.2): loss = LM loss + λ·sparsity loss (Eq. 17-19).

A nanoGPT-style loop on `accelerate.Accelerator`: the same code runs on a CPU, on one GPU, or on
many GPUs with FSDP under `accelerate launch` / `torchrun`. `batch_size` is the global batch in
sequences; each process takes its slice of it and accumulates gradients over micro-batches.

Auxiliary loss by variant: the sparsity loss (Eq. 19) weighted by λ for dsmoe, no_ste and no_gx;
LLaMA-MoE's CV² balance loss for topk, the Switch load-balancing loss for topk_switch; none for dense (the "dense continued" control).
Beyond the paper, off by default: a bounded λ controller (lambda_control.py), a separate gate learning rate,
a gate warm-up (`train.gate_warmup_steps`: the first steps train the gates alone at λ = 0, every other
weight frozen) and distillation from the dense base model (`train.distill`, distill.py).

This file: setup, the loop, the final save and the CLI; one step is in step.py, checkpoints and
the resume decision in checkpoint.py, stopping a diverged run in divergence.py, train_log.csv in log.py.
"""

import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import data as data_module
from ..atomic import check_out
from ..config import variant_train
from ..cpu import bf16_is_fast
from ..model import dsmoe_layers
from .checkpoint import clear_checkpoints, load_checkpoint, resume_point, run_fingerprint, save_checkpoint
from .distill import make_distill
from .divergence import DivergenceGuard
from .fsdp import check_layout, enable_fsdp_on_cpu, init_model, shard_like
from .lambda_control import lambda_controller
from .log import TrainLog
from .milestones import clear_stale_milestones, milestone_steps, save_milestone, warn_missed
from .preempt import RESUBMIT_EXIT, Preempted, StopRequest, check_attempt, record_resubmit
from .step import (SPARSITY_VARIANTS, accumulate_gradients, active_fraction, apply_variant, clip_gradients,
                   gate_only_gradients, optimizer_step, param_groups, pruning_masks)

logger = logging.getLogger(__name__)


def resolve_mixed_precision(name):
    """`auto`: bf16 where it is fast (a CUDA GPU with bf16, a CPU with AMX tiles: dsmoe.cpu), else fp32 ("no")."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if bf16_is_fast() else "no"


def batch_plan(train_config, seq_len, num_processes):
    """`(total_steps, accumulation)`: optimizer steps in the token budget, micro-batches per step and process."""
    batch, tokens = train_config["batch_size"], train_config["tokens"]
    if tokens < batch * seq_len:
        raise ValueError(f"token budget train.tokens={tokens:g} is smaller than one batch "
                         f"(batch_size {batch} x seq_len {seq_len} = {batch * seq_len} tokens)")
    if batch % num_processes:
        raise ValueError(f"batch_size {batch} is not divisible by the {num_processes} processes")
    per_process = batch // num_processes
    micro = min(train_config["micro_batch_size"], per_process)
    if per_process % micro:
        raise ValueError(f"batch_size {batch} / {num_processes} processes is not a multiple of micro_batch_size {micro}")
    return int(tokens // (batch * seq_len)), per_process // micro


def read_manifest(data_dir, seq_len):
    """The prepared data's manifest; it must have been packed into sequences of the config's `seq_len`."""
    manifest = data_module.read_manifest(data_dir)
    if manifest["seq_len"] != seq_len:
        raise ValueError(f"{data_dir} was prepared with seq_len {manifest['seq_len']}, the config asks for {seq_len}")
    return manifest


def check_tokenizer(manifest, tokenizer, data_dir, init):
    if manifest.get("tokenizer_fingerprint") not in (None, data_module.tokenizer_fingerprint(tokenizer)):
        raise ValueError(f"{data_dir} was tokenised with another tokenizer ({manifest['tokenizer']}) than {init}'s")


def make_optimizer(model, train_config, total_steps, fused=False):
    """AdamW and its learning-rate schedule over the whole run; `fused` (on CUDA): one kernel for all
    parameters, the same update as the default for-each implementation."""
    from transformers import get_scheduler

    tc = train_config
    optimizer = torch.optim.AdamW(param_groups(model, tc["weight_decay"], tc["gate_lr"]), lr=tc["lr"], betas=tc["betas"],
                                  fused=fused or None)
    scheduler = get_scheduler(tc["schedule"], optimizer, num_warmup_steps=tc["warmup_steps"], num_training_steps=total_steps)
    return optimizer, scheduler


class ProcessBatches:
    """This process's slice of each global batch the data mixture draws, as token ids.

    The next batch is read on a background thread while the current one trains (pinned for a
    non-blocking copy when training on CUDA); `position` is the sampler's state after the batches taken."""

    def __init__(self, data_dir, manifest, train_config, accelerator, start_step):
        from concurrent.futures import ThreadPoolExecutor

        self.sequences = data_module.load_train(data_dir)
        self.sampler = data_module.MixtureSampler({n: len(s) for n, s in self.sequences.items()},
                                                  {n: e["weight"] for n, e in manifest["sources"].items()},
                                                  train_config["batch_size"], train_config["seed"], start_step=start_step)
        self.per_process = train_config["batch_size"] // accelerator.num_processes
        self.first = accelerator.process_index * self.per_process
        self.pin = getattr(getattr(accelerator, "device", None), "type", "cpu") == "cuda"
        self.taken = self.sampler.state()
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsmoe-data")
        self.ahead = self.reader.submit(self._read)

    def _read(self):
        batch = self.sampler.next_batch()[self.first:][:self.per_process]
        ids = torch.from_numpy(np.stack([self.sequences[name][i] for name, i in batch]).astype(np.int64))
        return (ids.pin_memory() if self.pin else ids), self.sampler.state()

    def next_batch(self):
        ids, self.taken = self.ahead.result()
        self.ahead = self.reader.submit(self._read)
        return ids

    def position(self):
        return self.taken


@dataclass
class Run:
    """A run set up to train: what the loop reads."""

    config: dict  # the config's train section
    out: Path
    accelerator: object
    model: torch.nn.Module  # prepared by the accelerator
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    masked_params: list  # (parameter, mask) pairs: a Wanda-pruned init's zeros
    variant: str
    fingerprint: str
    total_steps: int
    accumulation: int
    tokens_per_step: int
    batches: ProcessBatches
    state: dict  # trainer_state.json of the checkpoint resumed from, or of step 0
    start: Path | None  # that checkpoint
    tensorboard: bool
    milestones: dict  # {step: milestone tokens} of the models kept in RUN/milestones/ (Tables 5-6)
    dtype: torch.dtype  # of the saved models
    distill: object = None  # distill.Distill: the frozen teacher, or None


def new_accelerator(mixed_precision, **kwargs):
    """An `Accelerator`; a second training in one process (a notebook, the tests) may change the precision.

    accelerate keeps one process-wide state and refuses a new mixed precision; the distributed part
    (PartialState) is kept, only the precision and gradient state are reset (accelerate's own tests do so)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    return enable_fsdp_on_cpu(Accelerator(mixed_precision=mixed_precision, **kwargs))


def setup(config, init, data_dir, out, variant, overwrite, resume, milestones=False):
    """Everything before the first step: accelerator, checked data and model, resume decision, optimizer."""
    from accelerate.utils import set_seed

    from ..hub import resolve_dtype

    tc = config["train"]
    check_out(out / "model", "model", overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    accelerator = new_accelerator(resolve_mixed_precision(tc["mixed_precision"]),
                                  log_with="tensorboard" if tensorboard else None, project_dir=str(out))
    if accelerator.is_main_process:
        logger.info("training on %d process(es), %s, mixed precision %s", accelerator.num_processes,
                    accelerator.distributed_type.value, accelerator.mixed_precision)
    manifest = read_manifest(data_dir, config["data"]["seq_len"])
    total_steps, accumulation = batch_plan(tc, manifest["seq_len"], accelerator.num_processes)
    set_seed(tc["seed"])
    model, tokenizer = init_model(init, accelerator, dtype=torch.float32)  # FSDP: on meta beside the main process
    log_host_memory(accelerator, "after loading the init")
    check_tokenizer(manifest, tokenizer, data_dir, init)
    variant = apply_variant(model, variant)
    check_recipe(tc, variant, accelerator)
    fingerprint = run_fingerprint(config, variant, manifest, model)
    distill = make_distill(tc["distill"], model, accelerator)  # the init's weights, before any step
    start = resume_point(out, fingerprint, resume, overwrite)
    clear_checkpoints(accelerator, out, start.discard)

    model.train()
    optimizer, scheduler = make_optimizer(model, tc, total_steps, fused=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped once per optimizer step, not per process
    # taken from the prepared parameters: under FSDP each mask is sharded like its parameter (a DTensor)
    named = dict(accelerator.unwrap_model(model).named_parameters())
    masked_params = [(named[name], shard_like(mask, named[name]))
                     for name, mask in pruning_masks(accelerator.unwrap_model(model), init).items()]
    state = {"step": 0, "fingerprint": fingerprint, "variant": variant, "sparsity_lambda": tc["sparsity_lambda"]}
    checkpoint = None
    if start.checkpoints:
        check_layout(accelerator, start.checkpoints[0])  # sharded (FSDP) or full, as this run writes them
        state, checkpoint = load_checkpoint(accelerator, out, start.checkpoints)
    batches = ProcessBatches(data_dir, manifest, tc, accelerator, start_step=state["step"])
    log_host_memory(accelerator, "after setup")
    tokens_per_step = tc["batch_size"] * manifest["seq_len"]
    kept = milestone_steps(config["eval"]["milestone_tokens"], tokens_per_step, total_steps) if milestones else {}
    clear_stale_milestones(accelerator, out, fingerprint, state["step"])
    warn_missed(kept, out, state["step"])
    return Run(config=tc, out=out, accelerator=accelerator, model=model, tokenizer=tokenizer, optimizer=optimizer,
               scheduler=scheduler, masked_params=masked_params, variant=variant, fingerprint=fingerprint,
               total_steps=total_steps, accumulation=accumulation,
               tokens_per_step=tokens_per_step, batches=batches, state=state,
               start=checkpoint, tensorboard=tensorboard, milestones=kept,
               dtype=resolve_dtype(config["dtype"]), distill=distill)


def check_recipe(tc, variant, accelerator):
    """The options beyond the paper that need a variant or a layout: refused before any work."""
    if tc["gate_warmup_steps"] > 0:
        if variant not in SPARSITY_VARIANTS:
            raise ValueError(f"train.gate_warmup_steps trains sigmoid gates at λ = 0; variant {variant} has none "
                             f"(use one of {', '.join(SPARSITY_VARIANTS)}) or set it to 0")
        if accelerator.distributed_type.name == "FSDP":
            raise ValueError("train.gate_warmup_steps is not supported under FSDP (flattened parameters)")


def reads_back(step, tc, run):
    """Whether `step` reads the divergence checks back to the host: a log, checkpoint or milestone step, the last."""
    return (step % tc["log_every"] == 0 or step % tc["checkpoint_every"] == 0 or step == run.total_steps
            or step in run.milestones)


def log_host_memory(accelerator, when):
    """This process's peak resident host memory so far, in the log: FSDP's efficient loading shows in it."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    logger.info("process %d: host memory peak %.0f MiB %s", accelerator.process_index, peak / 2**20, when)


def training_loop(run, stop=None):
    """Train from the step resumed at to the end of the token budget, logging and checkpointing on the way.

    The first `train.gate_warmup_steps` steps train the gates alone at λ = 0 (the controller waits).
    `stop` (preempt.StopRequest): when it asks (a signal, the time limit), checkpoint and raise Preempted."""
    tc, accelerator = run.config, run.accelerator
    step, lam = run.state["step"], run.state["sparsity_lambda"]
    layers = dsmoe_layers(run.model)
    control = lambda_controller(tc, lam, run.variant, run.state.get("lambda_control"))
    lam = control.lam if control else lam
    log = TrainLog(accelerator, run.out, step, layers, run.tokens_per_step, run.tensorboard)
    guard = DivergenceGuard(accelerator, layers, tc["all_experts_off_steps"], len(run.tokenizer), run.start)
    bar = tqdm(total=run.total_steps, initial=step, desc=f"train {run.variant}", unit="step",
               disable=not accelerator.is_local_main_process)
    n_stats, distilled = 4 + len(layers), []
    while step < run.total_steps:
        warming = step < tc["gate_warmup_steps"]
        step_lam = 0.0 if warming else lam
        step_stats = accumulate_gradients(accelerator, run.model, run.batches.next_batch(), run.accumulation, layers,
                                          run.variant, step_lam, tc["load_balancing_coef"], run.distill)
        step_stats, distilled = step_stats[:n_stats], distilled + [step_stats[n_stats:]]
        if warming:
            gate_only_gradients(run.model)
        grad_norm = clip_gradients(accelerator, run.model, tc["grad_clip"])
        guard.check_step(step + 1, step_stats, grad_norm, flush=reads_back(step + 1, tc, run))
        optimizer_step(run.optimizer, run.scheduler, run.masked_params)
        step += 1
        bar.update(1)
        log.add(step_stats)
        if step % tc["log_every"] == 0 or step == run.total_steps:
            extra = {"distill_loss": torch.cat(distilled).mean().item()} if run.distill is not None else None
            row, distilled = log.write(step, step_lam, run.scheduler.get_last_lr()[0], extra), []
            bar.set_postfix(lm_loss=f"{row['lm_loss']:.3f}", active=f"{row['mean_active_fraction']:.2f}")
        if control is not None and not warming:
            lam = control.update(active_fraction(step_stats[4:].tolist(), layers))
        if step in run.milestones:
            save_milestone(run, step, run.milestones[step], run.dtype)
        stopping = stop is not None and step < run.total_steps and stop.step_done(accelerator)
        if step % tc["checkpoint_every"] == 0 or step == run.total_steps or stopping:
            save_step(run, guard, step, lam, control)
        if stopping:
            bar.close()
            raise Preempted(step, stop.reason)
    bar.close()


def save_step(run, guard, step, lam, control):
    """Checkpoint `step` (after the divergence checks): λ is the configured one, also during the gate warm-up."""
    state = {"step": step, "fingerprint": run.fingerprint, "variant": run.variant, "sparsity_lambda": lam,
             "lambda_control": control.state_dict() if control else None,
             "data_position": run.batches.position(), "tokens": step * run.tokens_per_step}
    guard.flush()  # a preemption's checkpoint may come between two read-backs
    guard.check_weights(run.model, step)
    guard.saved(save_checkpoint(run.accelerator, run.out, step, state, run.config["keep_checkpoints"]))


def train(config, init, data_dir, out, variant=None, overwrite=False, resume=True, milestones=False, stop=None):
    """Continued pretraining of the model in `init` on the prepared data `data_dir`; write `out`.

    Resumes from the newest checkpoint in `out` of the same run unless `resume` is False; refuses
    checkpoints of a different config unless `overwrite`. With `milestones`, keeps the model at each of
    the config's `eval.milestone_tokens` in `out/milestones/`. The variant's `train_overrides` apply (the init
    model's own variant where `variant` is None). Returns the path of the final model (`out/model`)."""
    config = {**config, "train": variant_train(config, variant or init_variant(init))}
    run = setup(config, init, data_dir, Path(out), variant, overwrite, resume, milestones)
    training_loop(run, stop)
    pruning = Path(init) / "pruning.json"
    extra_files = [pruning] if pruning.is_file() else []
    return save_final_model(run.accelerator, run.model, run.tokenizer, run.out / "model", run.dtype,
                            extra_files, overwrite)


def init_variant(init):
    """The DSMoE variant an init model was converted as (its config.json), None for a dense one."""
    config = Path(init) / "config.json"
    return json.loads(config.read_text()).get("variant") if config.is_file() else None


def save_final_model(accelerator, model, tokenizer, path, dtype, extra_files=(), overwrite=False):
    """The trained model, in the run's dtype, via save_pretrained (atomic); FSDP shards are gathered.

    `extra_files` (a pruned init's pruning.json) are copied beside it."""
    from ..hub import save_model

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if state_dict is not None and accelerator.distributed_type.name == "FSDP":
            save_model(unwrapped, tokenizer, path, extra_files, overwrite,
                       state_dict={k: v.to(dtype) for k, v in state_dict.items()})
        else:
            save_model(unwrapped.to(dtype), tokenizer, path, extra_files, overwrite)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path


# ---------------------------------------------------------------- CLI: dsmoe train


def register(subparsers):
    p = subparsers.add_parser("train", help="continued pretraining of a (DSMoE or dense) model with the sparsity loss")
    p.add_argument("--config", required=True, help="run config YAML (its train and data sections)")
    p.add_argument("--init", required=True, help="model directory to start from: dense, pruned or DSMoE")
    p.add_argument("--data", required=True, help="data directory written by `dsmoe data prepare`")
    p.add_argument("--out", required=True, help="run directory: model/, train_log.csv, checkpoints/")
    p.add_argument("--variant", default=None,
                   help="dsmoe | no_ste | no_gx | topk | topk_switch: set the DSMoE training forward; dense: train the init as is "
                        "(LM loss only). Default: the init model's own variant, or dense")
    p.add_argument("--overwrite", action="store_true",
                   help="discard checkpoints of a different config in --out, and replace an --out/model that is not a dsmoe model")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if --out holds checkpoints")
    p.add_argument("--milestones", action="store_true",
                   help="keep the model at each of the config's eval.milestone_tokens in OUT/milestones/ (Tables 5-6)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-4")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="this job's walltime: checkpoint and exit 75 (resubmit) cluster.stop_margin_minutes before it")
    p.add_argument("--attempt", type=int, default=1, help="Snakemake's attempt number (refuses to retry real errors for ever)")
    p.set_defaults(func=cmd_train)


def cmd_train(args):
    from ..config import load_config, parse_overrides

    config = load_config(args.config, parse_overrides(args.set))
    cluster = config["cluster"]
    check_attempt(args.out, args.attempt, int(cluster["retry_failures"]))  # before anything is loaded
    limit = None if args.time_limit is None else args.time_limit * 60
    stop = StopRequest(limit, cluster["stop_margin_minutes"] * 60)
    try:
        path = train(config, args.init, args.data, args.out, args.variant, args.overwrite, not args.no_resume,
                     args.milestones, stop)
    except Preempted as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            record_resubmit(args.out, args.attempt, stopped.step, stopped.reason)
        print(f"dsmoe train: {stopped}", file=sys.stderr)
        return RESUBMIT_EXIT
    finally:
        stop.close()
    print(f"wrote {path}")
