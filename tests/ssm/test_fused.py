"""The ``fused`` scan's channel blocks: widths 16, 32 and 64, padded blocks, several workers."""

import threading

import numba
import pytest
import torch

from medssm.ssm import fused, selective_scan

from .scan_cases import make_inputs
from .test_scan_backends import check_against_reference

CASES = [  # batch, dim, L, N, groups: channels per group -> block width
    (2, 128, 70, 16, None),  # 128 -> 64
    (1, 96, 130, 5, 3),  # 32 -> 32
    (2, 80, 65, 16, 1),  # 80 -> 16
    (1, 72, 64, 3, 2),  # 36 -> 16, last block of each group padded (4 of 16 channels used)
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}L{}N{}g{}".format(*c))
def test_blocks_match_reference_float64(case, threads):
    batch, dim, length, n, groups = case
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("numba has a single thread here")
    kw = make_inputs(batch, dim, length, n, groups, requires_grad=True,
                     generator=torch.Generator().manual_seed(dim + length))
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        check_against_reference("fused", kw, softplus=True, last_state=True, seed=length)
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize(("batch", "groups", "per_group", "threads", "width"), [
    (1, 1, 128, 2, 64), (1, 1, 128, 4, 32), (1, 1, 96, 1, 32), (2, 2, 40, 1, 16), (1, 1, 8, 1, 16)])
def test_block_width(batch, groups, per_group, threads, width, monkeypatch):
    monkeypatch.setattr(fused.numba, "get_num_threads", lambda: threads)
    assert fused._block_width(batch, groups, per_group) == width


def test_concurrent_calls_from_python_threads():
    """numba's workqueue threading layer aborts on concurrent parallel calls: the kernels take turns."""
    kw = make_inputs(2, 64, 300, 16, dtype=torch.float32, requires_grad=True,
                     generator=torch.Generator().manual_seed(5))
    inputs = [v for v in kw.values() if v is not None]

    def run():
        out, last = selective_scan(**kw, delta_softplus=True, return_last_state=True, backend="fused")
        return [out.detach()] + list(torch.autograd.grad(out.sum() + last.sum(), inputs))

    want = run()
    results = [None] * 4

    def work(i):
        results[i] = run()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
