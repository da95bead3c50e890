"""FSDP2 worker of tests/test_distributed.py: `torchrun --standalone --nproc_per_node 2 fsdp2_worker.py OUT.pt`.

A tiny DSMoE model, each decoder layer and then the root wrapped by `fully_shard` (gloo on the CPU),
trained a few AdamW steps on each rank's half of one batch; rank 0 saves the mean losses and the
gathered weights. `train_steps(0, 1)` is the same training in one process, unsharded.
"""

import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import dsmoe
from dsmoe.losses import sparsity_loss

STEPS = 3


def tiny_dsmoe():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return dsmoe.convert(LlamaForCausalLM(config), n_experts=8, tau=0.5).train()


def train_steps(rank, world, shard=False):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = tiny_dsmoe()
    if shard:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1)).chunk(world)[rank]
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss + 0.01 * sparsity_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss)
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    return {"losses": torch.stack(losses), "state": state,
            "sharded": isinstance(model.model.layers[0].mlp.gate.weight, DTensor)}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = train_steps(dist.get_rank(), dist.get_world_size(), shard=True)
    if dist.get_rank() == 0:
        torch.save(result, sys.argv[1])
    dist.destroy_process_group()
