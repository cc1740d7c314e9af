"""The chunked loss equals the plain loss (value and gradients) and refuses the layouts where the
loss is applied outside the model's forward."""

from dataclasses import replace

import pytest
import torch

from arbor_titan.models.arbor import FLAVORS, Transformer
from arbor_titan.models.arbor.loss import (
    IGNORE_INDEX,
    ChunkedLoss,
    check_chunked_loss,
    cross_entropy_loss,
)


def loss_and_grads(model: Transformer, tokens, labels, chunked: bool):
    model.zero_grad()
    loss = model(tokens, labels_bs=labels) if chunked else cross_entropy_loss(model(tokens), labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("tie_embeddings", "chunk_len", "ignored"),
    [(False, 16, False), (True, 24, False), (False, 16, True)],
)
def test_chunked_loss_equals_the_plain_loss(tie_embeddings, chunk_len, ignored):
    args = replace(FLAVORS["debug"], vocab_size=512, tie_embeddings=tie_embeddings)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 64))
    labels = torch.randint(0, args.vocab_size, (2, 64))
    if ignored:  # chat labels: prompt positions ignored, the first chunk entirely
        labels[:, :16] = IGNORE_INDEX
        labels[:, 20:40:3] = IGNORE_INDEX
    plain, plain_grads = loss_and_grads(model, tokens, labels, chunked=False)
    model.chunked_loss = ChunkedLoss(cross_entropy_loss, chunk_len)  # 64 = 16·4 or 24+24+16
    chunked, chunked_grads = loss_and_grads(model, tokens, labels, chunked=True)
    assert chunked.item() == pytest.approx(plain.item(), abs=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_loss_without_counted_labels_is_zero_with_zero_gradients():
    logits = torch.randn(2, 8, 32, requires_grad=True)
    loss = cross_entropy_loss(logits, torch.full((2, 8), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()


def largest_saved_tensor(run) -> int:
    """Elements of the largest tensor autograd keeps for backward while `run()` executes."""
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        run()
    return max(saved)


def test_chunked_loss_keeps_no_whole_sequence_logits():
    args = replace(FLAVORS["debug"], vocab_size=4096, n_layers=1)
    model = Transformer(args)
    model.init_weights(seed=0)
    tokens = torch.randint(0, args.vocab_size, (1, 64))
    logits_numel = tokens.numel() * args.vocab_size
    plain = largest_saved_tensor(lambda: cross_entropy_loss(model(tokens), tokens))
    assert plain >= logits_numel  # the control: the plain loss keeps the log-probabilities
    model.chunked_loss = ChunkedLoss(cross_entropy_loss, 8)
    chunked = largest_saved_tensor(lambda: model(tokens, labels_bs=tokens))
    assert chunked < logits_numel / 4


def test_layouts_that_apply_the_loss_elsewhere_are_refused():
    check_chunked_loss(0, 2, 2)  # off: any layout
    with pytest.raises(ValueError, match="training.loss_chunk_len = 64 .* pipeline"):
        check_chunked_loss(64, 2, 1)
    with pytest.raises(ValueError, match="training.loss_chunk_len = 64 .* tensor parallel"):
        check_chunked_loss(64, 1, 2)
