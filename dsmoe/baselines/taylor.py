"""Gradients of the LM loss on calibration data, the input of first-order Taylor importance |w·∂L/∂w|.

One helper for the three Taylor-scored baselines (FFN channel, LLM-Pruner channel and block)."""

import contextlib

from tqdm.auto import tqdm


@contextlib.contextmanager
def calibration_gradients(model, calibration, weights, batch_size=1):
    """Inside the block, each of `weights` holds in `.grad` the LM-loss gradient summed over the
    `calibration` batches (N x T token ids); every other parameter is frozen. On exit the gradients
    are dropped and each parameter's requires_grad and the model's train/eval mode are restored."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        for batch in tqdm(calibration.split(batch_size), desc="taylor importance", leave=False):
            model(input_ids=batch, labels=batch).loss.backward()
        yield
    finally:
        for w in weights:
            w.grad = None
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)
