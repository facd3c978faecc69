"""The selective scan of Mamba-1, with one signature and several backends.

``selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
return_last_state=False, backend="auto")`` computes, per batch ``b``, channel ``d`` and state ``n``::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = sum_n C_t * h_t + D * u_t            (then y_t * silu(z_t) when z is given)

Shapes follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``: ``u, delta, z``:
``(batch, dim, L)``; ``A``: ``(dim, N)``; ``B, C``: ``(batch, N, L)`` or grouped
``(batch, G, N, L)`` where group ``g`` serves channels ``g*dim/G ... (g+1)*dim/G - 1``;
``D, delta_bias``: ``(dim,)``. The step size ``delta`` (after ``delta_bias`` and softplus) must be
>= 0 and ``A`` <= 0, as in every Mamba: then the state decays and every backend stays finite; a
negative step makes it grow, which ``reference`` follows further than ``chunked`` before overflowing.
The scan always computes in float32 (float64 if any input is float64), also under autocast, and
returns the dtype of ``u``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .backends import get_backend, resolve_backend


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
):
    """Selective scan with ``mamba_ssm``'s signature; see the module docstring for shapes.

    ``backend``: ``"reference"`` (sequential loop, the float64 oracle), ``"chunked"`` (pure
    PyTorch, any device, exports to ONNX), ``"fused"`` (compiled CPU kernel), ``"triton"``,
    ``"cuda"`` (``mamba_ssm``'s kernel) or ``"auto"``: the one :func:`medssm.ssm.use_backend`
    selected, else the fastest one available for the tensors' device.
    Returns ``out`` of shape ``(batch, dim, L)``, and ``last_state`` ``(batch, dim, N)`` when asked.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    for counter in _flop_counters:
        counter.append(scan_flops(u.shape[0], u.shape[1], u.shape[2], A.shape[1]))
    if _flop_counters and not _flop_counters[-1].compute:  # counted only: no arithmetic, right shapes
        out = torch.zeros_like(u)
        return (out, u.new_zeros(*u.shape[:2], A.shape[1])) if return_last_state else out
    name = resolve_backend(backend, u)
    out_dtype = u.dtype
    compute = torch.float64 if torch.float64 in {t.dtype for t in (u, delta, A, B, C)} else torch.float32
    cast = lambda t: None if t is None else t.to(compute)  # noqa: E731
    if B.dim() == 3:
        B = B.unsqueeze(1)  # (batch, 1, N, L)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    with torch.autocast(u.device.type, enabled=False):
        result = get_backend(name)(
            cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(z),
            cast(delta_bias), delta_softplus, return_last_state,
        )
    if return_last_state:
        out, last = result
        return out.to(out_dtype), last
    return result.to(out_dtype)


class _ScanCalls(list):
    """FLOPs of the scans made inside one :func:`count_scan_flops` block."""

    def __init__(self, compute: bool):
        super().__init__()
        self.compute = compute


_flop_counters: list[_ScanCalls] = []


def scan_flops(batch: int, dim: int, length: int, d_state: int) -> int:
    """Analytic forward FLOPs of one scan: about 9 per element of batch*dim*L*N (Mamba's count)."""
    return 9 * batch * dim * length * d_state


@contextmanager
def count_scan_flops(compute: bool = True) -> Iterator[list[int]]:
    """Collect the analytic FLOPs of every ``selective_scan`` call made inside the block.

    With ``compute=False`` each scan is only counted and returns zeros of its output's shape: for
    profilers that count the rest of a model (medssm info), so the scan's own arithmetic is not
    counted twice and costs nothing.

    >>> with count_scan_flops() as calls:
    ...     model(x)
    >>> total = sum(calls)
    """
    calls = _ScanCalls(compute)
    _flop_counters.append(calls)
    try:
        yield calls
    finally:
        _flop_counters.remove(calls)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        ok = (t.dim() == 3 and t.shape == (batch, n, length)) or (
            t.dim() == 4 and t.shape[0] == batch and t.shape[2:] == (n, length) and dim % t.shape[1] == 0
        )
        if not ok:
            raise ValueError(f"{name} must be (batch, N, L) or (batch, G, N, L) with G dividing dim; "
                             f"got {tuple(t.shape)} for u {tuple(u.shape)}, A {tuple(A.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
