"""SparseGPT against a brute-force OBS written from the equations, against magnitude pruning, and
through a whole decoder (sequential calibration on the pruned layers' outputs)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsmoe.baselines.sparsegpt import decoder_linear_param_count, hessian, layer_linears, prune_weight, sparsegpt


def correlated_inputs(tokens, cols, seed):
    """Inputs with very uneven, correlated features, as LLM activations are."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, cols, dtype=torch.float64)
    return torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mixing


def brute_force_obs(W, H, sparsity, block_size, damp=0.01):
    """SparseGPT's rule with explicit inverses of the sub-Hessians, no Cholesky, no lazy updates.

    Column j is eliminated while columns j.. are still free: OBS with Hinv_j = inv(H[j:, j:]).
    Saliency w_j² / Hinv_j[0, 0]; a pruned weight's removal is compensated on the free columns by
    -w_j / Hinv_j[0, 0] · Hinv_j[0, :]. Each block's mask is chosen on the weights at its start."""
    W, cols = W.double().clone(), W.shape[1]
    H = H.double() + damp * torch.diag(H).double().mean() * torch.eye(cols, dtype=torch.float64)
    inverses = [torch.linalg.inv(H[j:, j:]) for j in range(cols)]
    mask = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        saliency = torch.stack([W[:, j] ** 2 / inverses[j][0, 0] for j in range(start, end)], 1)
        n_prune = round(sparsity * saliency.numel())
        order = saliency.flatten().argsort()[:n_prune]
        block = torch.zeros(saliency.numel(), dtype=torch.bool)
        block[order] = True
        mask[:, start:end] = block.view_as(saliency)
        for j in range(start, end):
            for r in torch.nonzero(mask[:, j]).flatten():
                W[r, j:] -= W[r, j] / inverses[j][0, 0] * inverses[j][0, :]
    return W, mask


def output_error(W, W_pruned, X):
    return float(((X @ (W - W_pruned).T) ** 2).sum())


@pytest.mark.parametrize("block_size", [24, 7])
def test_sparsegpt_matches_brute_force_obs(block_size):
    rows, cols, sparsity = 12, 24, 0.5
    W = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    X = correlated_inputs(400, cols, seed=4)
    H = hessian(X)
    pruned, mask = prune_weight(W, H, sparsity, block_size=block_size)
    expected, expected_mask = brute_force_obs(W, H, sparsity, block_size)
    assert torch.equal(mask, expected_mask)
    assert (pruned[mask] == 0).all() and int(mask.sum()) == sum(
        round(sparsity * rows * (min(s + block_size, cols) - s)) for s in range(0, cols, block_size))
    torch.testing.assert_close(pruned, expected, rtol=1e-9, atol=1e-9)
    assert output_error(W, pruned, X) == pytest.approx(output_error(W, expected, X), rel=1e-9)


def test_sparsegpt_beats_magnitude_on_held_out_inputs():
    rows, cols, sparsity = 64, 96, 0.5
    W = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    X = correlated_inputs(4000, cols, seed=6)
    calibration, held_out = X[:2000], X[2000:]
    pruned, mask = prune_weight(W, hessian(calibration), sparsity, block_size=32)
    magnitude = W.clone()
    magnitude.view(-1)[W.abs().flatten().argsort()[: int(mask.sum())]] = 0.0  # same number of zeros
    assert int((magnitude == 0).sum()) == int(mask.sum())
    assert output_error(W, pruned, held_out) < 0.8 * output_error(W, magnitude, held_out)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).double().eval()


def test_sparsegpt_model_is_sequential_over_every_decoder_linear():
    model, sparsity = tiny_llama(), 0.5
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(7))
    masks = sparsegpt(model, sparsity, calibration, batch_size=2, block_size=16)
    assert len(masks) == 3 * 7  # q, k, v, o, gate, up, down in each of 3 layers
    zeros = sum(int(m.sum()) for m in masks.values())
    assert abs(zeros - sparsity * decoder_linear_param_count(model)) <= len(masks)  # one weight per matrix
    for name, param in model.named_parameters():
        if "layers" not in name or not name.endswith("proj.weight"):
            assert torch.equal(param, original[name]), name  # embeddings, norms, lm_head untouched
    # layer 2's q_proj was calibrated on the outputs of the *pruned* layers 0 and 1
    captured = []
    q_proj = model.model.layers[2].self_attn.q_proj
    handle = q_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        for batch in calibration.split(2):
            model(input_ids=batch)
    handle.remove()
    weight = original["model.layers.2.self_attn.q_proj.weight"]
    expected, _ = prune_weight(weight, hessian(torch.cat(captured)), sparsity, block_size=16)
    torch.testing.assert_close(q_proj.weight, expected, rtol=1e-7, atol=1e-9)
    dense_inputs = []
    dense = tiny_llama()
    handle = dense.model.layers[2].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: dense_inputs.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        dense(input_ids=calibration)
    handle.remove()
    from_dense, _ = prune_weight(weight, hessian(torch.cat(dense_inputs)), sparsity, block_size=16)
    assert not torch.allclose(q_proj.weight, from_dense)  # the check above can tell the two apart


def test_layer_linears_finds_all_seven():
    names = set(layer_linears(tiny_llama().model.layers[0]))
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
