"""The default CPU thread count: the cores other processes leave free, ``--threads N`` overriding it."""

from __future__ import annotations

import logging

import faiss
import pytest
import torch

from model.threads import apply_threads, choose_threads, free_cores, usable_cores


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [
        (2, 0.0, 2),  # a quiet machine: every core
        (2, 0.4, 2),  # background noise rounds away
        (2, 1.0, 1),  # one busy process on two cores: one thread, not two fighting over one core
        (2, 1.6, 1),
        (2, 3.0, 1),  # overloaded: still one thread
        (16, 4.4, 12),
        (1, 0.0, 1),
        (4, -1.0, 4),  # a nonsensical load counts as none
    ],
)
def test_free_cores_subtracts_the_busy_ones(cores: int, load: float, expected: int) -> None:
    assert free_cores(cores, load) == expected


def test_the_default_reads_cores_and_load_and_logs_its_choice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="model.threads"):
        assert choose_threads(None, cores=8, load=2.9) == 5
    assert "using 5 CPU threads: 8 cores, load average 2.90" in caplog.text


def test_the_machine_default_is_within_the_usable_cores() -> None:
    assert 1 <= choose_threads(None) <= usable_cores()


def test_threads_flag_overrides_the_load(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="model.threads"):
        assert choose_threads(3, cores=2, load=5.0) == 3
    assert "using 3 CPU threads (--threads)" in caplog.text
    assert choose_threads(0, cores=4, load=1.0) == 3  # 0: the default, as before


def test_apply_threads_sizes_torch_and_faiss() -> None:
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        apply_threads(1)
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
