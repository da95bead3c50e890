"""FSDP2 through `accelerate launch` (workflow/accelerate/fsdp.yaml): what the trainer adds to accelerate.

- On CPU processes (gloo) accelerate 1.15-1.16 runs the FSDP config as DDP (its FSDP plugin is
  enabled for GPU-like devices only). torch's `fully_shard` runs on gloo, so `enable_fsdp_on_cpu`
  switches the state to FSDP there: the tests run the multi-GPU line on the CPU.
- With `fsdp_cpu_ram_efficient_loading` only the main process reads the weights; the others build the
  model on the meta device (`init_model`) and receive their shards from it in `accelerator.prepare`,
  so host memory does not grow with the GPU count.
- A pruned init's masks are taken from the prepared (sharded) parameters, so each mask is a DTensor
  with its parameter's mesh and placements (`shard_like` for a mask computed before `prepare`).
- Checkpoints: an FSDP run writes sharded ones (torch.distributed.checkpoint: they load on any number
  of FSDP processes), a run without FSDP full ones; `check_layout` refuses the other kind, saying how to go on.
"""

import os
from pathlib import Path

import torch

SHARDED, FULL = "sharded (FSDP: pytorch_model_fsdp_0/, optimizer_0/)", "full (one process or DDP: model.safetensors, optimizer.bin)"


def is_fsdp(accelerator):
    return accelerator.distributed_type.name == "FSDP"


def enable_fsdp_on_cpu(accelerator):
    """Under `accelerate launch` with the FSDP config on CPU processes, run FSDP2 (gloo) instead of DDP."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU or \
            os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return accelerator
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch sets
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def efficient_loading(accelerator):
    return is_fsdp(accelerator) and bool(accelerator.state.fsdp_plugin.cpu_ram_efficient_loading)


def init_model(init, accelerator, dtype=torch.float32):
    """`(model, tokenizer)` of `init`: the weights on the main process; on the others, with efficient
    loading, parameters on the meta device (buffers real), filled by `prepare` from the main process."""
    from ..hub import load_model, resolve_model

    path, gguf_file = resolve_model(str(init))
    if accelerator.is_main_process or not efficient_loading(accelerator) or gguf_file is not None:
        return load_model(str(init), dtype=dtype)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = _tokenizer(init)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer


def _tokenizer(init):
    from ..hub import _load_tokenizer, resolve_model

    path, gguf_file = resolve_model(str(init))
    tokenizer = _load_tokenizer(str(init), path, gguf_file)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def shard_like(mask, param):
    """`mask` laid out as `param`: a DTensor on its mesh with its placements where `param` is one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and not isinstance(mask, DTensor):
        return distribute_tensor(mask.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return mask.to(param.device)


def checkpoint_layout(checkpoint):
    checkpoint = Path(checkpoint)
    if any(checkpoint.glob("pytorch_model_fsdp_*")):
        return SHARDED
    if any(checkpoint.glob("model*.safetensors")) or any(checkpoint.glob("pytorch_model*.bin")):
        return FULL
    return None


def check_layout(accelerator, checkpoint):
    """Refuse a checkpoint of the other layout before loading it: name both and how to go on."""
    found, wanted = checkpoint_layout(checkpoint), SHARDED if is_fsdp(accelerator) else FULL
    if found is None or found == wanted:
        return
    how = ("resume it with the FSDP config (accelerate launch --config_file workflow/accelerate/fsdp.yaml, "
           "any number of processes: sharded checkpoints reshard), or start over from its weights: "
           f"accelerate merge-weights {Path(checkpoint) / 'pytorch_model_fsdp_0'} MERGED, then copy the init's "
           "config and tokenizer files into MERGED and train with --init MERGED --no-resume (the optimizer state is lost)"
           if found == SHARDED else
           "resume it without FSDP (one process, or the DDP line), or start over from its weights "
           f"({Path(checkpoint) / 'model.safetensors'}, with the init's config and tokenizer files) with --no-resume")
    raise ValueError(f"checkpoint {checkpoint} is {found} but this run is "
                     f"{'FSDP' if wanted == SHARDED else 'not FSDP'} and loads {wanted} checkpoints: {how}")
