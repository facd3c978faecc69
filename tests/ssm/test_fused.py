"""The ``fused`` scan's blocks, workers and vector helpers, against ``reference`` in float64."""

import threading

import numba
import numpy as np
import pytest
import torch

from medssm.ssm import fused, selective_scan

from .scan_cases import make_inputs
from .test_scan_backends import check_against_reference

CASES = [  # batch, dim, L, N, groups (float64: 8 channels per block, CHUNK = 32 steps)
    (2, 128, 70, 16, None),  # 16 blocks per batch element; L not a multiple of the chunk
    (1, 48, 130, 5, None),  # 6 blocks: on 2 workers the second starts inside the group (its B, C
    #                         gradients go to its own buffer, added afterwards)
    (3, 16, 64, 3, None),  # 2 blocks per batch element: 6 blocks, worker 2 starts mid-group
    (1, 96, 33, 5, 3),  # 32 channels per group: 4 blocks each; one step past a chunk
    (2, 80, 97, 16, 1),  # 80 channels: the last block of each batch element full
    (1, 72, 64, 3, 2),  # 36 channels per group: the last block of each group padded (4 of 8 channels)
    (2, 20, 40, 2, None),  # 20 channels: padded block after full ones, batch 2
]


@pytest.fixture
def torch_threads():
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}L{}N{}g{}".format(*c))
def test_blocks_match_reference_float64(case, threads, torch_threads):
    batch, dim, length, n, groups = case
    torch_threads(threads)
    kw = make_inputs(batch, dim, length, n, groups, requires_grad=True,
                     generator=torch.Generator().manual_seed(dim + length))
    check_against_reference("fused", kw, softplus=True, last_state=True, seed=length)


def test_threads_follow_torch(torch_threads, monkeypatch):
    """Every call, forward and backward, runs on as many threads as torch uses at that moment (at
    most one per block), and on torch's own OpenMP threads where torch has them."""
    if "OpenMP" in torch.__config__.parallel_info():
        assert fused._GOMP_PARALLEL is not None
    calls = []
    run = fused._run
    monkeypatch.setattr(fused, "_run", lambda kernel, arguments, threads: (calls.append((kernel, threads)),
                                                                             run(kernel, arguments, threads)))
    kw = make_inputs(1, 64, 40, 4, dtype=torch.float32, requires_grad=True, generator=torch.Generator().manual_seed(3))
    for threads in (1, 3, 8):  # 64 float32 channels: 4 blocks
        torch_threads(threads)
        selective_scan(**kw, delta_softplus=True, backend="fused").sum().backward()
        assert calls[-2:] == [("forward", min(threads, 4)), ("backward", min(threads, 4))]


def test_float32_deterministic_across_threads_and_calls(torch_threads):
    """Same float32 results on every call; the B, C gradients also when another worker count splits
    the groups differently (each partial sum is taken in a fixed order)."""
    kw = make_inputs(1, 48, 100, 16, dtype=torch.float32, requires_grad=True,
                     generator=torch.Generator().manual_seed(4))
    inputs = [v for v in kw.values() if v is not None]

    def run():
        out = selective_scan(**kw, delta_softplus=True, backend="fused")
        return [out.detach()] + list(torch.autograd.grad(out.square().sum(), inputs))

    for threads in (1, 2):
        torch_threads(threads)
        first, second = run(), run()
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_concurrent_calls_from_python_threads():
    """Calls from several Python threads at once (each on its own OpenMP team) give the same results."""
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


@numba.njit
def _vector_ops(a, b, out):
    lanes = 64 // a.itemsize
    fused.vstore(out, 0, fused.vexp2(fused.vload(a, 0)))
    fused.vtranspose(a, 0, lanes, out, lanes, lanes)
    fused.vstore(out, lanes + lanes * lanes, fused.vrow_dots(a, 0, lanes, b, 0, lanes))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_helpers(dtype):
    """2^x (float32: the polynomial, within 2.5e-7 relative; 0 below 2^-125), the in-register
    transpose and the dot products of a tile's rows."""
    lanes = 64 // np.dtype(dtype).itemsize
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(lanes * lanes) * 30).astype(dtype)
    a[:3] = [-130.0, 0.0, 100.0]
    b = rng.standard_normal(lanes * lanes).astype(dtype)
    out = np.zeros(2 * lanes + lanes * lanes, dtype)
    _vector_ops(a, b, out)
    exact = np.exp2(a[:lanes].astype(np.float64))
    if dtype == np.float32:
        exact[a[:lanes] < -125] = 0
    np.testing.assert_allclose(out[:lanes], exact, rtol=2.5e-7 if dtype == np.float32 else 1e-15)
    np.testing.assert_array_equal(out[lanes:lanes + lanes * lanes].reshape(lanes, lanes), a.reshape(lanes, lanes).T)
    dots = (a.reshape(lanes, lanes).astype(np.float64) * b.reshape(lanes, lanes)).sum(1)
    np.testing.assert_allclose(out[lanes + lanes * lanes:], dots, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 * np.abs(dots).max())
