"""The ``chunked`` scan: pure PyTorch, any device, exports to ONNX for any sequence length.

The recurrence ``h_t = exp(a_t) h_{t-1} + x_t`` (``a = delta * A``, ``x = delta * u * B``) is cut
into chunks of ``CHUNK`` steps; within a chunk the steps are unrolled, each one elementwise op
over all chunks at once:

1. every chunk's end state from a zero state;
2. the chunks, as single steps (decay ``exp(A * sum of the chunk's delta)``, input its end state),
   obey the same recurrence one level up: solved the same way, recursively, it gives the state
   entering each chunk;
3. every chunk again from that state: all states, and ``y_t = C_t . h_t``.

Every factor is a decay ``exp(delta * A) <= 1``: no exponent is positive, so nothing overflows at
any step size or length, and no clamp is needed.

Memory and speed: the channels are taken in blocks whose (CHUNK, block, N, batch, chunks) tensors
hold ``CACHE_BLOCK_ELEMENTS`` on CPU (1 MiB in float32, so the ~10 passes over them stay in
cache) and ``LARGE_BLOCK_ELEMENTS`` (64 MiB) elsewhere and under tracing (each block adds a copy
of the scan's nodes to the graph); only the end states (1/CHUNK of a full-size tensor) exist for
all channels at once.
Under ``no_grad`` two buffers serve every block and step 3 recomputes the block's decays and
inputs instead of keeping them; with autograd they are kept (autograd saves them anyway).

Export: under tracing nothing depends on the sequence length L. Padding is by the constant
``CHUNK`` then a slice at the traced ``ceil(L / CHUNK) * CHUNK`` (``F.pad`` with a computed amount
would freeze it; the integer division has non-negative operands, so ONNX's truncating Div is
exact). The recursion depth is fixed at trace time: what the traced length needs plus
``EXTRA_LEVELS``; an input with more than ``CHUNK ** (depth + 1)`` steps leaves several chunks at
the top level, solved by one masked product of ``exp(A (s_i - s_j))``, ``j <= i`` (``s`` the
cumulative delta: rounding grows with ``s``, so export near the length you run). The block size
is frozen at the traced length too: a longer input makes proportionally larger blocks.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .backends import register_backend
from .reference import finish_output, prepare_delta

CHUNK = 16
EXTRA_LEVELS = 2  # under tracing: levels above what the traced length needs (up to CHUNK**2 times longer)
# Elements of a block tensor: on CPU 1 MiB of float32, so the passes over a block stay in cache;
# on other devices, and in a traced graph (where every block is another copy of the scan's nodes), 64 MiB.
CACHE_BLOCK_ELEMENTS = 1 << 18
LARGE_BLOCK_ELEMENTS = 1 << 24


def _to_chunks(v: torch.Tensor, padded) -> torch.Tensor:
    """(..., L) -> (CHUNK, ..., padded / CHUNK), zero-padded: step ``c * CHUNK + t`` at ``[t, ..., c]``."""
    if torch.jit.is_tracing() or v.shape[-1] != padded:
        v = F.pad(v, (0, CHUNK))[..., :padded]
    v = v.unflatten(-1, (-1, CHUNK))
    return v.permute(v.dim() - 1, *range(v.dim() - 1)).contiguous()  # not movedim: exported with axis -1


def _ends(e: torch.Tensor, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """End state of every chunk from a zero state; ``e``, ``x``: (CHUNK, ..., chunks)."""
    es, xs = e.unbind(0), x.unbind(0)
    h = xs[0].clone() if inplace else xs[0]
    for t in range(1, CHUNK):
        h = torch.addcmul(xs[t], es[t], h, out=h) if inplace else torch.addcmul(xs[t], es[t], h)
    return h


def _states(e: torch.Tensor, x: torch.Tensor, carry: torch.Tensor | None, inplace: bool) -> torch.Tensor:
    """All states of the chunks, each entered with ``carry`` (None: zero); written over ``x`` if ``inplace``."""
    es, xs = e.unbind(0), x.unbind(0)
    if inplace:
        if carry is not None:
            torch.addcmul(xs[0], es[0], carry, out=xs[0])
        for t in range(1, CHUNK):
            torch.addcmul(xs[t], es[t], xs[t - 1], out=xs[t])
        return x
    hs = [xs[0] if carry is None else torch.addcmul(xs[0], es[0], carry)]
    for t in range(1, CHUNK):
        hs.append(torch.addcmul(xs[t], es[t], hs[-1]))
    return torch.stack(hs)


def _carries(dt_sum: torch.Tensor, ends: torch.Tensor, A: torch.Tensor, n, depth: int, inplace: bool):
    """The state entering each of the ``n`` chunks (None: all zero), from each chunk's summed delta
    (..., 1, ..., n) and end state from zero (..., N, ..., n); ``depth`` levels of chunks, then one
    masked product. ``n`` is passed, not read from the tensors: under tracing the exporter's shape
    inference loses track of some sizes and would freeze them at the traced values."""
    if not torch.jit.is_tracing() and n == 1:
        return None
    if depth == 0:
        s = dt_sum.cumsum(-1)
        steps = torch.arange(n, device=s.device)
        causal = steps[:, None] >= steps[None, :]
        log_decay = (s.unsqueeze(-1) - s.unsqueeze(-2)) * A.unsqueeze(-1)  # (..., n_i, n_j)
        states = (torch.exp(torch.where(causal, log_decay, -torch.inf)) * ends.unsqueeze(-2)).sum(-1)
    else:
        padded = (n + CHUNK - 1) // CHUNK * CHUNK
        dts, xs = _to_chunks(dt_sum, padded), _to_chunks(ends, padded)
        e = torch.exp(dts * A)
        carry = _carries(dts.sum(0), _ends(e, xs, inplace), A, padded // CHUNK, depth - 1, inplace)
        states = _states(e, xs, carry, inplace)
        states = states.permute(*range(1, states.dim()), 0).flatten(-2)[..., :n]
    return F.pad(states[..., :-1], (1, 0))  # chunk c is entered with chunk c-1's end state


def _depth(length: int) -> int:
    """Levels of chunks above the first that leave a single chunk of ``length`` steps."""
    depth, span = 0, CHUNK
    while span < length:
        depth, span = depth + 1, span * CHUNK
    return depth


@register_backend("chunked")
def chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """Chunked scan in channel blocks; see the module docstring."""
    delta = prepare_delta(delta, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    per_group = dim // groups
    tracing = torch.jit.is_tracing()
    with warnings.catch_warnings():  # under tracing the sizes read here only fix the depth and block size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced_batch, traced_length = int(batch), int(length)
    depth = _depth(traced_length) + (EXTRA_LEVELS if tracing else 0)
    budget = CACHE_BLOCK_ELEMENTS if u.device.type == "cpu" and not tracing else LARGE_BLOCK_ELEMENTS
    block = max(1, min(per_group, budget // (traced_batch * n_state * (traced_length + CHUNK))))
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    inplace = not (keep or tracing)

    padded = (length + CHUNK - 1) // CHUNK * CHUNK  # not -(-a // b): ONNX's integer Div truncates
    dt = _to_chunks(delta.transpose(0, 1), padded).unsqueeze(2)  # (T, dim, 1, batch, chunks)
    dtu = _to_chunks((delta * u).transpose(0, 1), padded).unsqueeze(2)
    B, C = (_to_chunks(t.permute(1, 2, 0, 3), padded) for t in (B, C))  # (T, G, N, batch, chunks)
    A = A[:, :, None, None]  # (dim, N, 1, 1)
    blocks = [(c0, min(c0 + block, (g + 1) * per_group), g)
              for g in range(groups) for c0 in range(g * per_group, (g + 1) * per_group, block)]
    if inplace:
        e_buf = u.new_empty(CHUNK, block, n_state, batch, dt.shape[-1])
        x_buf, y = torch.empty_like(e_buf), u.new_empty(CHUNK, dim, batch, dt.shape[-1])

    def decays_and_inputs(c0, c1, g):  # (T, block, N, batch, chunks) each
        if inplace:
            e = torch.mul(dt[:, c0:c1], A[c0:c1], out=e_buf[:, :c1 - c0]).exp_()
            return e, torch.mul(dtu[:, c0:c1], B[:, g:g + 1], out=x_buf[:, :c1 - c0])
        return torch.exp(dt[:, c0:c1] * A[c0:c1]), dtu[:, c0:c1] * B[:, g:g + 1]

    kept, ends = [], []
    for c0, c1, g in blocks:
        e, x = decays_and_inputs(c0, c1, g)
        ends.append(_ends(e, x, inplace))
        kept.append((e, x) if keep else None)
    ends = torch.cat(ends) if len(ends) > 1 else ends[0]  # (dim, N, batch, chunks)
    carries = _carries(dt.sum(0), ends, A, padded // CHUNK, depth, inplace)
    ys, lasts = [], []
    for (c0, c1, g), pair in zip(blocks, kept):
        e, x = pair or decays_and_inputs(c0, c1, g)
        h = _states(e, x, None if carries is None else carries[c0:c1], inplace)
        if return_last_state:  # the padded steps (decay 1, input 0) keep the last state
            lasts.append(h[-1, ..., -1].clone())
        if inplace:
            torch.sum(h.mul_(C[:, g:g + 1]), 2, out=y[:, c0:c1])
        else:
            ys.append((h * C[:, g:g + 1]).sum(2))
    if not inplace:
        y = torch.cat(ys, 1) if len(ys) > 1 else ys[0]  # (T, dim, batch, chunks)
    out = finish_output(y.permute(2, 1, 3, 0).flatten(-2)[..., :length], u, D, z)
    if return_last_state:
        return out, torch.cat(lasts).permute(2, 0, 1)
    return out
