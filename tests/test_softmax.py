"""The chunked full-softmax cross-entropy equals the whole-tensor one, loss and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.sasrec import EncoderConfig, SASRec
from model.softmax import full_softmax_ce


def reference(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = h @ table.T
    logits[:, 0] = -math.inf  # the padding id, as SASRec.scores
    return F.cross_entropy(logits, targets)


def _case(m: int = 37, n: int = 23, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(m, d, generator=g, dtype=torch.float64)
    table = torch.randn(n + 1, d, generator=g, dtype=torch.float64)
    targets = torch.randint(1, n + 1, (m,), generator=g)
    return h, table, targets


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])  # one row, uneven chunks, exactly one, more than M
def test_loss_and_gradients_equal_the_whole_tensor_version(chunk: int) -> None:
    h, table, targets = _case()
    h1, t1 = h.clone().requires_grad_(), table.clone().requires_grad_()
    h2, t2 = h.clone().requires_grad_(), table.clone().requires_grad_()
    ours = full_softmax_ce(h1, t1, targets, chunk=chunk)
    ref = reference(h2, t2, targets)
    (3.0 * ours).backward()  # an upstream gradient other than 1 scales both
    (3.0 * ref).backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-12)
    assert h1.grad is not None and h2.grad is not None and t1.grad is not None and t2.grad is not None
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=0, atol=1e-12)
    assert torch.count_nonzero(t1.grad[0]) == 0  # the padding row never scores


def test_a_frozen_table_gets_no_gradient_and_the_states_still_do() -> None:
    h, table, targets = _case()
    h1 = h.clone().requires_grad_()
    full_softmax_ce(h1, table, targets, chunk=5).backward()
    h2 = h.clone().requires_grad_()
    reference(h2, table, targets).backward()
    assert table.grad is None
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=1e-12)


def test_without_autograd_it_is_the_loss_alone() -> None:
    h, table, targets = _case()
    with torch.no_grad():
        loss = full_softmax_ce(h.requires_grad_(), table, targets)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(reference(h.detach(), table, targets).item(), abs=1e-12)


def test_large_logits_do_not_overflow() -> None:
    h, table, targets = _case()
    h = h * 1e3  # logits in the thousands: exp() of them is inf without the max shift
    loss = full_softmax_ce(h, table, targets)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(reference(h, table, targets).item(), rel=1e-12)


def test_the_encoder_loss_is_the_cross_entropy_of_its_scores() -> None:
    torch.manual_seed(0)
    model = SASRec(EncoderConfig(n_items=30, dim=16, n_heads=2, n_layers=1, max_len=5))
    h, targets = torch.randn(11, 16), torch.randint(1, 31, (11,))
    assert model.next_item_loss(h, targets).item() == pytest.approx(
        F.cross_entropy(model.scores(h), targets).item(), abs=1e-5
    )


def test_shapes_are_checked() -> None:
    h, table, targets = _case()
    with pytest.raises(ValueError, match="targets"):
        full_softmax_ce(h, table, targets[:-1])
    with pytest.raises(ValueError, match="table"):
        full_softmax_ce(h, table[:, :-1], targets)
    with pytest.raises(ValueError, match="chunk"):
        full_softmax_ce(h, table, targets, chunk=0)
