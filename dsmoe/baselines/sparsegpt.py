"""SparseGPT (Frantar & Alistarh, 2023): one-shot unstructured pruning with OBS reconstruction.

Every nn.Linear of every decoder layer (q, k, v, o, gate, up, down) is pruned to the same
sparsity s. Layers are processed in order; layer l is calibrated on the outputs of layers
0..l-1 *after* they were pruned (the paper's sequential scheme). For one linear W (rows x cols)
with calibration inputs X (cols x tokens):

    H = 2 X Xᵀ / tokens,  H += 1% · mean(diag H) · I,  U = chol(H⁻¹) (upper),
    per block of 128 columns: mask the s-fraction of the block with the smallest w² / U_jj²,
    then column by column: q = w masked, err = (w - q) / U_jj, W[:, j:] -= err · U[j, j:],
    and after the block W[:, later] -= Err · U[block, later] (lazy batch update).

Written here rather than imported: the maintained implementation (llmcompressor) pins
transformers <= 5.17 and brings auto-round; the original repository is a research script, not a
package. This follows the reference code of the paper's repository (IST-DASLab/sparsegpt,
`SparseGPT.fasterprune`) with one change: a block's mask holds exactly round(s · numel)
weights (the reference masks every weight <= the threshold, one more on ties), so that the
parameter count matches the target exactly. Columns whose input is always zero ("dead") are
zeroed and their Hessian diagonal set to 1, as in the reference.
"""

import torch
from tqdm.auto import tqdm

from ..model import decoder_layers

BLOCK_SIZE = 128
DAMP = 0.01


def hessian(inputs):
    """H = 2 X Xᵀ / tokens (float64) of a linear layer's inputs, any shape (..., cols)."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return 2.0 * x.T @ x / x.shape[0]


def prune_weight(weight, H, sparsity, block_size=BLOCK_SIZE, damp=DAMP):
    """The SparseGPT reconstruction of `weight` (rows x cols) at `sparsity`, given its Hessian H.

    Computes in the weight's dtype promoted to float32 at least (float32, as the reference code, for
    float32 models). Returns `(pruned_weight, mask)`; `mask` is True where a weight was removed."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W = weight.detach().to(dtype).clone()
    H = H.to(dtype).clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1, U1 = W[:, start:end].clone(), U[start:end, start:end]
        score = W1 ** 2 / torch.diag(U1).unsqueeze(0) ** 2
        n_prune = int(round(sparsity * score.numel()))
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if n_prune:
            mask1.view(-1)[torch.topk(score.flatten(), n_prune, largest=False).indices] = True
        Err1 = torch.zeros_like(W1)
        for j in range(end - start):
            w, d = W1[:, j], U1[j, j]
            q = w.masked_fill(mask1[:, j], 0.0)
            err = (w - q) / d
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            W1[:, j] = q
            Err1[:, j] = err
        W[:, start:end] = W1
        W[:, end:] -= Err1 @ U[start:end, end:]
        mask[:, start:end] = mask1
    return W, mask | dead.unsqueeze(0)


def layer_linears(layer):
    """Every nn.Linear of a decoder layer, by its name inside the layer, in module order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


class _Stop(Exception):
    pass


def decoder_inputs(model, calibration, batch_size=1):
    """The (hidden_states, kwargs) that the first decoder layer receives, one pair per batch."""
    first, captured = decoder_layers(model)[0], []

    def catch(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _layer_hessians(layer, inputs):
    linears, sums, hooks = layer_linears(layer), {}, []

    def hook(name):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            count, total = sums.get(name, (0, 0.0))
            sums[name] = (count + x.shape[0], total + 2.0 * x.T @ x)
        return accumulate

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        for hidden, kwargs in inputs:
            layer(hidden, **kwargs)
    finally:
        for handle in hooks:
            handle.remove()
    return {name: total / count for name, (count, total) in sums.items()}


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def sparsegpt(model, sparsity, calibration, batch_size=1, block_size=BLOCK_SIZE, damp=DAMP):
    """Prune every linear layer of every decoder layer to `sparsity`, layer by layer, in place.

    Returns {"layers.{i}.{name}": bool mask of removed weights}."""
    was_training = model.training
    model.eval()
    masks = {}
    try:
        inputs = decoder_inputs(model, calibration, batch_size)
        for i, layer in enumerate(tqdm(decoder_layers(model), desc="sparsegpt", leave=False)):
            hessians = _layer_hessians(layer, inputs)
            for name, linear in layer_linears(layer).items():
                pruned, mask = prune_weight(linear.weight, hessians[name], sparsity, block_size, damp)
                linear.weight.copy_(pruned.to(linear.weight.dtype))
                masks[f"layers.{i}.{name}"] = mask
            inputs = [(_hidden(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
    finally:
        model.train(was_training)
    return masks


def decoder_linear_param_count(model):
    """Weights of every nn.Linear inside the decoder layers (what SparseGPT prunes)."""
    return sum(m.weight.numel() for layer in decoder_layers(model) for m in layer_linears(layer).values())


__all__ = ["decoder_inputs", "decoder_linear_param_count", "hessian", "layer_linears", "prune_weight", "sparsegpt"]
