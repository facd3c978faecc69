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

import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

Backend = Callable[..., "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str):
    """Decorator: make ``fn`` selectable as ``selective_scan(..., backend=name)``.

    A backend receives prepared inputs: float32/float64 tensors, ``B``/``C`` always grouped
    ``(batch, G, N, L)``, ``delta_bias`` and ``delta_softplus`` not yet applied.
    """

    def wrap(fn: Backend) -> Backend:
        _BACKENDS[name] = fn
        return fn

    return wrap


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


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
    PyTorch, any device, exports to ONNX), ``"fused"`` (compiled CPU kernel), ``"cuda"``
    (``mamba_ssm``'s kernel) or ``"auto"`` (the fastest one available for the tensors' device).
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
        result = _BACKENDS[name](
            cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(z),
            cast(delta_bias), delta_softplus, return_last_state,
        )
    if return_last_state:
        out, last = result
        return out.to(out_dtype), last
    return result.to(out_dtype)


_warned_fallback = False
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


def is_exporting() -> bool:
    """True while ``torch.jit`` traces or ``torch.onnx`` exports: only plain torch ops may run."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def resolve_backend(backend: str, u: torch.Tensor) -> str:
    """The concrete backend ``backend`` stands for, for tensors like ``u``."""
    global _warned_fallback
    if backend != "auto":
        if backend not in _BACKENDS:
            raise ValueError(f"unknown scan backend {backend!r}; available: {available_backends()}")
        return backend
    exporting = is_exporting()
    if u.device.type == "cuda" and not exporting:
        preference = ("cuda", "triton", "chunked")
    elif u.device.type == "cpu" and not exporting:
        preference = ("fused", "chunked")
        if "fused" not in _BACKENDS and not _warned_fallback:
            warnings.warn("medssm: the fused CPU scan (numba) could not be loaded; using the slower "
                          "'chunked' scan", RuntimeWarning, stacklevel=3)
            _warned_fallback = True
    else:
        preference = ("chunked",)
    return next((name for name in preference if name in _BACKENDS), "reference")


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


def prepare_delta(delta, delta_bias, delta_softplus):
    """``softplus(delta + delta_bias)`` (each step as asked), shared by the PyTorch backends."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if delta_softplus else delta


def finish_output(y, u, D, z):
    """``(y + D u) * silu(z)``, each term as given."""
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def expand_groups(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, G, N, L) -> (batch, dim, N, L): each group serves dim/G consecutive channels."""
    return t.repeat_interleave(dim // t.shape[1], dim=1)


@register_backend("reference")
def reference_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """Sequential loop over L. Iterates over ``unbind``-ed slices, so its backward stays O(L)."""
    delta = prepare_delta(delta, delta_bias, delta_softplus)
    batch, dim, _ = u.shape
    B, C = expand_groups(B, dim), expand_groups(C, dim)  # (batch, dim, N, L)
    h = u.new_zeros(batch, dim, A.shape[1])  # (batch, dim, N)
    ys = []
    for u_t, d_t, B_t, C_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(d_t[..., None] * A) * h + (d_t * u_t)[..., None] * B_t
        ys.append((h * C_t).sum(-1))
    out = finish_output(torch.stack(ys, dim=-1), u, D, z)
    return (out, h) if return_last_state else out


# Backends register themselves on import; the fused CPU scan needs numba and is optional.
from . import chunked  # noqa: E402,F401
from . import cuda  # noqa: E402,F401
from . import triton_scan  # noqa: E402,F401  registers "triton" when triton imports

try:
    from . import fused  # noqa: E402,F401
except (ImportError, OSError):  # numba/llvmlite missing or unloadable: "auto" warns, uses chunked
    pass
