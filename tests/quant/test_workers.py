"""quant.workers: pieces on one intra-op thread each, spread over threads; the same results as one by one,
in order, and torch's thread count restored (also after an error)."""

from __future__ import annotations

import pytest
import torch

from mixbits.quant import kquant
from mixbits.quant.spec import GGML_TYPES
from mixbits.quant.workers import map_pieces, one_intraop_thread

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_pieces_come_back_in_order_and_the_thread_count_is_restored(two_threads):
    seen = []

    def fn(i):
        seen.append(torch.get_num_threads())
        return i * i

    assert map_pieces(fn, list(range(9)), CPU) == [i * i for i in range(9)]
    assert set(seen) == {1}  # every piece ran on one intra-op thread
    assert torch.get_num_threads() == 2


def test_the_thread_count_is_restored_after_an_error(two_threads):
    with pytest.raises(ZeroDivisionError):
        map_pieces(lambda i: 1 // i, [1, 0, 2], CPU)
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), one_intraop_thread() as before:
        assert before == 2 and torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("name", ["Q4_K", "Q3_K", "Q5_1", "IQ4_NL", "IQ4_XS"])
def test_the_grid_does_not_depend_on_the_thread_count(name, monkeypatch):
    """Row chunks spread over 2 threads give bit for bit the grid of 1 thread, chunk by chunk (IQ4_NL/XS: 5 chunks
    of their own)."""
    spec = GGML_TYPES[name]
    w = torch.randn(40, 512, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(kquant, "_CHUNK", 512 * 3)  # 14 chunks of 3 rows
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kquant.choose_params(w, spec)
        torch.set_num_threads(2)
        two = kquant.choose_params(w, spec)
    finally:
        torch.set_num_threads(before)
    for field in ("d", "dmin", "sc", "mn"):
        assert torch.equal(getattr(one, field).view(torch.int32), getattr(two, field).view(torch.int32)), field
