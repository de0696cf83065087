"""The training forward equals the serving (paged) forward."""

import torch

from draft_models.dense_forward import causal_hidden, pad_batch
from specserve.engine.model_runner import prompt_logits


def test_causal_hidden_matches_paged_forward_with_padding(smollm):
    model = smollm.model
    long = smollm.tokenizer.encode("Speculative decoding drafts tokens that the target verifies in one pass.")
    short = long[:5]
    hidden = causal_hidden(model, pad_batch([torch.tensor(long), torch.tensor(short)], torch.device("cpu")))
    assert hidden.shape == (2, len(long), 576)
    with torch.no_grad():
        for row, ids in enumerate((long, short)):
            ours = model.compute_logits(hidden[row, : len(ids)])
            torch.testing.assert_close(ours, prompt_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_pad_batch_right_pads_with_zero():
    batch = pad_batch([torch.tensor([5, 6, 7]), torch.tensor([8])], torch.device("cpu"))
    assert batch.tolist() == [[5, 6, 7], [8, 0, 0]]
