"""Continued pretraining (paper §4.3, §5.1-5.2): loss = LM loss + λ·sparsity loss (Eq. 17-19).

A nanoGPT-style loop on `accelerate.Accelerator`: the same code runs on a CPU, on one GPU, or on
many GPUs with FSDP under `accelerate launch` / `torchrun`. `batch_size` is the global batch in
sequences; each process takes its slice of it and accumulates gradients over micro-batches.

Auxiliary loss by variant: the sparsity loss (Eq. 19) weighted by λ for dsmoe, no_ste and no_gx;
the Switch load-balancing loss for topk; none for dense (the "dense continued" control).
Beyond the paper, off by default: an adaptive λ (ReMoE style) and a separate gate learning rate.
"""

import contextlib
import csv
import hashlib
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import data as data_module
from ..losses import load_balancing_loss, sparsity_loss
from ..model import VARIANTS, dsmoe_layers

logger = logging.getLogger(__name__)

LOG_ONLY_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "micro_batch_size")


class TrainingDiverged(ValueError):
    pass


def apply_variant(model, variant):
    """Set the training forward of every DSMoE layer to `variant`; `None` keeps the model's own.

    Returns the variant trained: `dense` for a model without DSMoE layers (or when asked)."""
    layers = dsmoe_layers(model)
    if variant is None:
        return model.config.variant if layers else "dense"
    if variant == "dense":
        return "dense"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of dense, {', '.join(VARIANTS)}")
    if not layers:
        raise ValueError(f"variant {variant!r} needs a DSMoE model but the init model is dense: "
                         "convert it first (dsmoe convert) or train it with --variant dense")
    if variant == "topk" and not 1 <= model.config.num_experts_per_tok <= model.config.n_experts:
        raise ValueError(f"topk needs 1 <= num_experts_per_tok <= n_experts, got {model.config.num_experts_per_tok}")
    for layer in layers:
        layer.variant = variant
    model.config.variant = variant
    return variant


def auxiliary_losses(model, variant):
    """`(sparsity, load_balancing)` of the latest forward; None where the variant has no such term."""
    if variant == "dense":
        return None, None
    if variant == "topk":
        return None, load_balancing_loss(model)
    return sparsity_loss(model), None


def micro_batch_loss(model, input_ids, variant, lam, balance_coef):
    """Forward one micro-batch: the loss to minimise and its terms `[loss, lm, sparsity, balance]` (detached)."""
    lm_loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    sparse, balance = auxiliary_losses(model, variant)
    sparse = lm_loss.new_zeros(()) if sparse is None else sparse
    balance = lm_loss.new_zeros(()) if balance is None else balance
    loss = lm_loss + lam * sparse + balance_coef * balance
    return loss, torch.stack([loss, lm_loss, sparse, balance]).detach().float()


def mean_active_experts(layers):
    """Per-layer mean number of active experts per token in the latest forward.

    For no_gx, whose training forward runs every expert, count the experts with σ > τ, which
    inference would run."""
    counts = []
    for layer in layers:
        active = layer.last_gate_probs > layer.tau if layer.variant == "no_gx" else layer.last_active
        counts.append(active.float().sum(-1).mean())
    return torch.stack(counts).detach() if counts else torch.zeros(0)


def active_fraction(per_layer_active, layers):
    """Mean over layers of the fraction of experts active per token (1.0 for a dense model)."""
    if not layers:
        return 1.0
    return float(np.mean([k / layer.n_experts for k, layer in zip(per_layer_active, layers)]))


def param_groups(model, weight_decay, gate_lr=None):
    """AdamW groups: weight decay on matrices only (nanoGPT); the gates apart when `gate_lr` is set."""
    decay, no_decay, gates = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if gate_lr is not None and name.endswith("mlp.gate.weight"):
            gates.append(param)
        else:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if gates:
        groups.append({"params": gates, "weight_decay": weight_decay, "lr": gate_lr})
    return [group for group in groups if group["params"]]


def batch_plan(train_config, seq_len, num_processes):
    """`(total_steps, micro_batch, accumulation)` for the global `batch_size` and token budget."""
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
    return int(tokens // (batch * seq_len)), micro, per_process // micro


def run_fingerprint(config, variant, manifest, model):
    """What makes two runs the same run: training settings, data, variant and the init model's shape."""
    train = {k: v for k, v in config["train"].items() if k not in LOG_ONLY_KEYS}
    init = {"model_type": model.config.model_type, "params": sum(p.numel() for p in model.parameters()),
            "n_experts": getattr(model.config, "n_experts", None), "tau": getattr(model.config, "tau", None)}
    spec = {"train": train, "variant": variant, "data": manifest["fingerprint"], "init": init}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def checkpoints(run_dir):
    """Finished checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def resume_point(run_dir, fingerprint, resume, overwrite):
    """The checkpoint to resume from, or None; refuse a run directory of a different config."""
    found = checkpoints(run_dir)
    if not found:
        return None
    state = json.loads((found[-1] / "trainer_state.json").read_text())
    if state["fingerprint"] != fingerprint and not overwrite:
        raise ValueError(f"{run_dir} holds checkpoints of a different config (fingerprint {state['fingerprint']}, "
                         f"this run {fingerprint}); pass --overwrite to discard them, or choose another --out")
    if state["fingerprint"] != fingerprint or not resume:
        return "discard"
    return found[-1]


def save_checkpoint(accelerator, run_dir, step, trainer_state, keep):
    """accelerator.save_state into RUN/checkpoints/step_N, atomically; keep the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp-step_{step}", root / f"step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def log_row(step, tokens, stats, layers, lam, lr, tokens_per_s):
    """One row of train_log.csv from the mean step statistics `[loss, lm, sparsity, balance, per-layer active]`."""
    per_layer = stats[4:].tolist()
    return {"step": step, "tokens": tokens, "lm_loss": stats[1].item(), "sparsity_loss": stats[2].item(),
            "load_balancing_loss": stats[3].item(), "lambda": lam, "lr": lr, "tokens_per_s": tokens_per_s,
            "mean_active_fraction": active_fraction(per_layer, layers),
            **{f"layer_{i}": k for i, k in enumerate(per_layer)}}


class CsvLog:
    """RUN/train_log.csv, one row per log interval; rows after the resumed step are dropped."""

    def __init__(self, path, start_step):
        from ..atomic import atomic_file

        self.path = Path(path)
        if self.path.exists():
            with open(self.path, newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= start_step]
            with atomic_file(self.path) as handle:
                if rows:
                    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)

    def append(self, row):
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def pruning_masks(model, init):
    """Masks that keep an unstructured-pruned (Wanda) init's zeros at zero through training.

    `dsmoe baseline prune --kind wanda` writes pruning.json beside the weights; the FFN weights that
    are zero at init stay zero, so the trained model keeps its matched activated params."""
    info = Path(init) / "pruning.json"
    if not info.is_file() or json.loads(info.read_text()).get("kind") != "wanda":
        return {}
    suffixes = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    return {name: param != 0 for name, param in model.named_parameters() if name.endswith(suffixes)}


def resolve_mixed_precision(name):
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def train(config, init, data_dir, out, variant=None, overwrite=False, resume=True):
    """Continued pretraining of the model in `init` on the prepared data `data_dir`; write `out`.

    Returns the path of the final model (`out/model`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from ..hub import load_model, resolve_dtype

    tc, out = config["train"], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(tc["mixed_precision"]),
                              log_with="tensorboard" if tensorboard else None, project_dir=str(out))
    manifest = data_module.read_manifest(data_dir)
    seq_len = manifest["seq_len"]
    if seq_len != config["data"]["seq_len"]:
        raise ValueError(f"{data_dir} was prepared with seq_len {seq_len}, the config asks for {config['data']['seq_len']}")
    total_steps, micro, accumulation = batch_plan(tc, seq_len, accelerator.num_processes)
    set_seed(tc["seed"])
    model, tokenizer = load_model(str(init), dtype=torch.float32)
    if manifest.get("tokenizer_fingerprint") not in (None, data_module.tokenizer_fingerprint(tokenizer)):
        raise ValueError(f"{data_dir} was tokenised with another tokenizer ({manifest['tokenizer']}) than {init}'s")
    variant = apply_variant(model, variant)
    fingerprint = run_fingerprint(config, variant, manifest, model)
    start = resume_point(out, fingerprint, resume, overwrite)
    if accelerator.is_main_process:
        if start == "discard":
            shutil.rmtree(out / "checkpoints")
        for stale in (out / "checkpoints").glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    start = None if start == "discard" else start
    accelerator.wait_for_everyone()

    masks = pruning_masks(model, init)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, tc["weight_decay"], tc["gate_lr"]), lr=tc["lr"], betas=tc["betas"])
    scheduler = get_scheduler(tc["schedule"], optimizer, num_warmup_steps=tc["warmup_steps"], num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped once per optimizer step, not per process
    named = dict(accelerator.unwrap_model(model).named_parameters())
    masked_params = [(named[name], mask.to(named[name].device)) for name, mask in masks.items()]
    adaptive = tc["adaptive_sparsity"]
    trainer_state = {"step": 0, "fingerprint": fingerprint, "variant": variant, "sparsity_lambda": tc["sparsity_lambda"]}
    if start is not None:
        accelerator.load_state(str(start))
        trainer_state = json.loads((start / "trainer_state.json").read_text())
        logger.info("resuming from %s", start)
    step = trainer_state["step"]
    lam = trainer_state["sparsity_lambda"]

    sequences = data_module.load_train(data_dir)
    sampler = data_module.MixtureSampler({n: len(s) for n, s in sequences.items()},
                                         {n: e["weight"] for n, e in manifest["sources"].items()},
                                         tc["batch_size"], tc["seed"], start_step=step)
    per_process = tc["batch_size"] // accelerator.num_processes
    layers = dsmoe_layers(model)
    log = CsvLog(out / "train_log.csv", step) if accelerator.is_main_process else None
    if tensorboard:
        accelerator.init_trackers("tensorboard")
    tokens_per_step = tc["batch_size"] * seq_len
    interval = []  # step statistics since the last log row
    last_checkpoint, tick = (str(start) if start else None), time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {variant}", unit="step",
               disable=not accelerator.is_local_main_process)
    while step < total_steps:
        batch = sampler.next_batch()[accelerator.process_index * per_process:][:per_process]
        input_ids = torch.from_numpy(np.stack([sequences[name][i] for name, i in batch]).astype(np.int64))
        step_stats = torch.zeros(4 + len(layers), device=accelerator.device)
        for k, ids in enumerate(input_ids.to(accelerator.device).split(micro)):
            sync = k == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss, terms = micro_batch_loss(model, ids, variant, lam, tc["load_balancing_coef"])
                accelerator.backward(loss / accumulation)
            step_stats += torch.cat([terms, mean_active_experts(layers).to(terms.device)]) / accumulation
        step_stats = accelerator.reduce(step_stats, "mean")  # loss, lm, sparsity, balance, per-layer active
        if not torch.isfinite(step_stats[0]):
            raise TrainingDiverged(f"loss is {step_stats[0].item()} at step {step + 1}; training stopped. "
                                   f"Last good checkpoint: {last_checkpoint or 'none'}")
        if tc["grad_clip"] > 0:
            accelerator.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        optimizer.step()
        with torch.no_grad():
            for param, mask in masked_params:
                param.mul_(mask)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        lam_used = lam
        if adaptive["enabled"] and variant in ("dsmoe", "no_ste", "no_gx"):  # beyond the paper
            too_dense = active_fraction(step_stats[4:].tolist(), layers) > adaptive["target_fraction"]
            lam = lam * adaptive["rate"] if too_dense else lam / adaptive["rate"]
        interval.append(step_stats.cpu())
        if step % tc["log_every"] == 0 or step == total_steps:
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            row = log_row(step, step * tokens_per_step, torch.stack(interval).mean(0), layers, lam_used,
                          scheduler.get_last_lr()[0], len(interval) * tokens_per_step / elapsed)
            interval = []
            if log is not None:
                log.append(row)
            if tensorboard:
                accelerator.log(row, step=step)
            bar.set_postfix(lm_loss=f"{row['lm_loss']:.3f}", active=f"{row['mean_active_fraction']:.2f}")
        if step % tc["checkpoint_every"] == 0 or step == total_steps:
            trainer_state = {"step": step, "fingerprint": fingerprint, "variant": variant, "sparsity_lambda": lam,
                             "data_position": sampler.state(), "tokens": step * tokens_per_step}
            last_checkpoint = str(save_checkpoint(accelerator, out, step, trainer_state, tc["keep_checkpoints"]))
    bar.close()
    extra_files = [Path(init) / "pruning.json"] if (Path(init) / "pruning.json").is_file() else []
    return save_final_model(accelerator, model, tokenizer, out / "model", resolve_dtype(config["dtype"]), extra_files)


def save_final_model(accelerator, model, tokenizer, path, dtype, extra_files=()):
    """The trained model, in the run's dtype, via save_pretrained (atomic); FSDP shards are gathered.

    `extra_files` (a pruned init's pruning.json) are copied beside it."""
    from ..hub import save_model

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if state_dict is not None and accelerator.distributed_type.name == "FSDP":
            save_model(unwrapped, tokenizer, path, extra_files, state_dict={k: v.to(dtype) for k, v in state_dict.items()})
        else:
            save_model(unwrapped.to(dtype), tokenizer, path, extra_files)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path


# ---------------------------------------------------------------- CLI: dsmoe train, dsmoe data prepare


def register(subparsers):
    p = subparsers.add_parser("train", help="continued pretraining of a (DSMoE or dense) model with the sparsity loss")
    p.add_argument("--config", required=True, help="run config YAML (its train and data sections)")
    p.add_argument("--init", required=True, help="model directory to start from: dense, pruned or DSMoE")
    p.add_argument("--data", required=True, help="data directory written by `dsmoe data prepare`")
    p.add_argument("--out", required=True, help="run directory: model/, train_log.csv, checkpoints/")
    p.add_argument("--variant", default=None,
                   help="dsmoe | no_ste | no_gx | topk: set the DSMoE training forward; dense: train the init as is "
                        "(LM loss only). Default: the init model's own variant, or dense")
    p.add_argument("--overwrite", action="store_true", help="discard checkpoints of a different config in --out")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if --out holds checkpoints")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-4")
    p.set_defaults(func=cmd_train)


def cmd_train(args):
    from ..config import load_config, parse_overrides

    config = load_config(args.config, parse_overrides(args.set))
    path = train(config, args.init, args.data, args.out, args.variant, args.overwrite, not args.no_resume)
    print(f"wrote {path}")
