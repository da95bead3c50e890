"""The training path's efficiency changes give the same results on the CPU: fused AdamW against the
for-each one, the routing coefficient in the compute dtype under bf16 autocast, the data read ahead on
a thread (same batches, the sampler position of the batches taken), the padding test on the host."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dsmoe
from dsmoe import data
from dsmoe.config import validate_config
from dsmoe.train.step import micro_batch_loss
from dsmoe.train.trainer import ProcessBatches, make_optimizer
from test_sparse_ffn import tiny_layer

TRAIN = {"tokens": 8 * 32 * 8, "batch_size": 8, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "seed": 7,
         "mixed_precision": "no"}


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return dsmoe.convert(LlamaForCausalLM(config), n_experts=8, tau=0.5).train()


def test_fused_adamw_matches_the_for_each_one():
    config = validate_config({"data": {"seq_len": 32}, "train": TRAIN})["train"]
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    weights = []
    for fused in (False, True):
        model = tiny_model()
        optimizer, scheduler = make_optimizer(model, config, total_steps=8, fused=fused)
        assert bool(optimizer.defaults["fused"]) == fused
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        weights.append(model.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_training_forward_keeps_the_intermediate_in_the_autocast_dtype():
    layer = tiny_layer().train()
    seen = []
    layer.down_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    hidden = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
    expected = layer(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(hidden)
    assert seen == [torch.float32, torch.bfloat16]  # was promoted to fp32 by the fp32 coefficient
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, bpe_tokenizer):
    config = validate_config({"data": {"seq_len": 32, "val_sequences": 2}, "train": TRAIN})
    root = tmp_path_factory.mktemp("efficiency")
    data.prepare(config, bpe_tokenizer, root / "data")
    return config, root / "data"


def test_data_read_ahead_gives_the_same_batches_and_position(prepared):
    config, data_dir = prepared
    manifest = data.read_manifest(data_dir)
    accelerator = SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu"))
    batches = ProcessBatches(data_dir, manifest, config["train"], accelerator, start_step=1)
    sequences = data.load_train(data_dir)
    sampler = data.MixtureSampler({n: len(s) for n, s in sequences.items()},
                                  {n: e["weight"] for n, e in manifest["sources"].items()}, 8, 7, start_step=1)
    for _ in range(3):
        expected = [sequences[name][i] for name, i in sampler.next_batch()[4:8]]
        assert torch.equal(batches.next_batch(), torch.from_numpy(np.stack(expected).astype(np.int64)))
        assert batches.position() == sampler.state()  # the batches taken, not the one read ahead


def test_micro_batch_inputs_are_built_on_the_host():
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    ids[1, 10:] = data.PAD  # truncate mode: a padded row
    on_host = micro_batch_loss(model, ids, "dsmoe", 0.01, 0.0, device=torch.device("cpu"))[1]
    before = micro_batch_loss(model, ids, "dsmoe", 0.01, 0.0)[1]
    torch.testing.assert_close(on_host, before, rtol=0, atol=0)


def test_truncate_mode_padding_needs_no_attention_mask(monkeypatch):
    """A right-padded micro-batch runs without the attention mask (causal attention already hides the
    padding after each real token): the same loss and terms as with the mask; padding elsewhere keeps it."""
    from dsmoe.train import step

    model = tiny_model()
    ids = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(4))
    ids[0, 9:], ids[2, 14:] = data.PAD, data.PAD
    assert step.trailing_padding_only(ids)
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: seen.append("attention_mask" in kw) or forward(**kw))
    without_mask = micro_batch_loss(model, ids, "dsmoe", 0.01, 0.0)[1]
    monkeypatch.setattr(step, "trailing_padding_only", lambda ids: False)
    with_mask = micro_batch_loss(model, ids, "dsmoe", 0.01, 0.0)[1]
    assert seen == [False, True]
    torch.testing.assert_close(without_mask, with_mask, rtol=1e-5, atol=1e-6)
    ids[1, 3] = data.PAD  # padding inside a row: the mask stays
    assert not step.trailing_padding_only(ids)


def test_divergence_checks_read_back_only_when_flushed():
    """Between log/checkpoint steps the checks stay on the device (no .item()); the next read-back stops
    the run at the first failed step since the last one, naming it."""
    from torch.profiler import ProfilerActivity, profile

    from dsmoe.train import TrainingDiverged
    from dsmoe.train.divergence import DivergenceGuard

    guard = DivergenceGuard(SimpleNamespace(scaler=None), [], None, vocab_size=96)
    stats = [torch.tensor([2.0, 2.0, 0.0, 0.0]), torch.tensor([float("nan"), 2.0, 0.0, 0.0]), torch.tensor([3.0, 3.0, 0.0, 0.0])]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step, row in enumerate(stats, start=1):
            guard.check_step(step, row, torch.tensor(1.0), flush=False)
    assert not [e for e in prof.key_averages() if e.key == "aten::_local_scalar_dense"]
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2"):
        guard.flush()
    guard.check_step(4, stats[0], torch.tensor(float("inf")), flush=False)
    with pytest.raises(TrainingDiverged, match="gradient norm is inf at step 4"):
        guard.check_step(5, stats[0], torch.tensor(1.0), flush=True)
