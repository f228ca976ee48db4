"""The SASRec encoder: shapes, causality, padding invariance, tied output weights."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from model.sasrec import Block, EncoderConfig, SASRec


@pytest.fixture
def encoder() -> SASRec:
    torch.manual_seed(0)
    return SASRec(EncoderConfig(n_items=30, max_len=8, dim=16, n_heads=2, inner_dim=32)).eval()


def test_shapes_and_last_state(encoder: SASRec) -> None:
    items = torch.tensor([[3, 4, 5, 0, 0], [7, 8, 9, 10, 11]])
    states = encoder(items)
    assert states.shape == (2, 5, 16)
    h = encoder.encode(items, torch.tensor([3, 5]))
    torch.testing.assert_close(h, torch.stack([states[0, 2], states[1, 4]]))
    assert encoder.scores(h).shape == (2, 31)


def test_output_at_t_ignores_later_items(encoder: SASRec) -> None:
    a = torch.tensor([[1, 2, 3, 4, 5, 6]])
    b = torch.tensor([[1, 2, 3, 29, 28, 27]])  # same first three items, different future
    sa, sb = encoder(a), encoder(b)
    torch.testing.assert_close(sa[:, :3], sb[:, :3])
    assert not torch.allclose(sa[:, 3:], sb[:, 3:])


def test_padding_does_not_change_real_positions(encoder: SASRec) -> None:
    short = torch.tensor([[4, 9, 2]])
    padded = torch.tensor([[4, 9, 2, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(encoder(short), encoder(padded)[:, :3])
    # and the batch neighbour's length does not matter either
    batch = torch.tensor([[4, 9, 2, 0, 0], [1, 2, 3, 4, 5]])
    torch.testing.assert_close(
        encoder.encode(batch, torch.tensor([3, 5]))[0], encoder.encode(short, torch.tensor([3]))[0]
    )


def test_scores_reuse_the_item_table_and_never_rank_padding(encoder: SASRec) -> None:
    h = torch.randn(2, 16)
    scores = encoder.scores(h)
    torch.testing.assert_close(scores[:, 1:], h @ encoder.item_emb.weight[1:].T)
    assert (scores[:, 0] == -math.inf).all()


def test_init_follows_the_config(encoder: SASRec) -> None:
    block = encoder.blocks[0]
    assert isinstance(block, Block)
    fc1 = block.ffn.fc1
    assert float(fc1.weight.detach().std()) == pytest.approx(0.02, abs=0.003)  # N(0, 0.02), 512 draws
    assert float(fc1.bias.detach().abs().max()) == 0.0


def test_too_long_input_is_refused(encoder: SASRec) -> None:
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_len 8"):
        encoder(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_len 8"):
        encoder.encode(torch.ones(2, 12, dtype=torch.long), torch.tensor([12, 3]))
    assert encoder(torch.ones(1, 8, dtype=torch.long)).shape == (1, 8, 16)  # max_len itself is fine


def test_heads_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match=r"dim \(18\) must be divisible by n_heads \(4\)"):
        SASRec(EncoderConfig(n_items=5, max_len=4, dim=18, n_heads=4))


def test_input_checks_survive_python_optimise_mode() -> None:
    # `python -O` strips assert statements; the encoder's checks must still refuse bad input there.
    code = (
        "import torch\n"
        "from model.sasrec import EncoderConfig, SASRec\n"
        "assert False, 'asserts are live: this is not -O'\n"
    )
    probe = (
        "enc = SASRec(EncoderConfig(n_items=5, max_len=4, dim=8, n_heads=2))\n"
        "try:\n"
        "    enc(torch.ones(1, 5, dtype=torch.long))\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-O", "-c", code + probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "refused: sequence length 5 exceeds max_len 4"
