"""The ``chunked`` scan: pure PyTorch, any device, exports to ONNX.

The recurrence ``h_t = exp(a_t) h_{t-1} + x_t`` (``a = delta * A``, ``x = delta * u * B``) is
solved in chunks of ``CHUNK`` steps with cumulative log-decays ``c_t = a_0 + ... + a_t``::

    h_t = exp(c_t - m) * (exp(m) h_in + sum_{s <= t} exp(m - c_s) x_s)

one ``cumsum`` per chunk instead of a loop, ``m`` the value of ``c`` in the middle of the chunk. The
chunks' end states obey the same recurrence one level up (decay = the chunk's total), so the
same function solves it recursively: ``CHUNK`` steps, ``CHUNK**2`` at the next level, and so on.

Guard: ``exp(m - c_s)`` overflows once a chunk's range of ``c`` passes ~2 x 88 in float32. Each
step's log-decay is clamped below at ``-K`` with ``CHUNK * K / 2`` inside that budget (also at the
upper levels, where a "step" is a whole chunk). For the model's decays (``delta >= 0``, ``A < 0``)
this is exact up to ``e^-K`` relative: two steps with a clamped step between them are more than
``e^-K`` apart before and after the clamp. So the scan stays finite for any step size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .scan import finish_output, prepare_delta, register_backend

CHUNK = 8
# Lower bound on a step's log-decay: exponents stay within CHUNK * K / 2, which leaves e^16 (float32)
# of headroom below the largest float for the state's own magnitude; e^-K is under the dtype's rounding.
LOG_DECAY_BOUND = {torch.float32: 18.0, torch.float64: 40.0}


def scan_states(log_decay: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """All states of ``h_t = exp(log_decay_t) h_{t-1} + x_t``, ``h_{-1} = 0``, along dim -2 of (..., L, N)."""
    length = x.shape[-2]
    chunks = (length + CHUNK - 1) // CHUNK  # not -(-a // b): ONNX's integer Div truncates
    if chunks * CHUNK != length:
        pad = (0, 0, 0, chunks * CHUNK - length)  # padded steps: decay 1, input 0
        log_decay, x = F.pad(log_decay, pad), F.pad(x, pad)
    bound = LOG_DECAY_BOUND[x.dtype]
    log_decay = log_decay.clamp_min(-bound).unflatten(-2, (chunks, CHUNK))  # (..., chunks, CHUNK, N)
    x = x.unflatten(-2, (chunks, CHUNK))
    cum = log_decay.cumsum(-2)
    # Any reference m gives the same h; c at step CHUNK/2 - 1 keeps every exponent within CHUNK/2 * K.
    middle = cum.narrow(-2, CHUNK // 2 - 1, 1).detach()
    inner = (torch.sub(middle, cum).exp_() * x).cumsum(-2)  # the chunk's sum, as if it started from 0
    if chunks > 1:
        local_ends = inner[..., -1, :] * torch.exp(cum[..., -1, :] - middle[..., 0, :])  # (..., chunks, N)
        ends = scan_states(cum[..., -1, :], local_ends)
        carry_in = F.pad(ends.narrow(-2, 0, chunks - 1), (0, 0, 1, 0))  # state entering each chunk
        inner = inner + torch.exp(middle) * carry_in.unsqueeze(-2)
    states = torch.sub(cum, middle).exp_() * inner
    return states.flatten(-3, -2).narrow(-2, 0, length)


@register_backend("chunked")
def chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """Chunked cumulative-log-decay scan; see the module docstring."""
    delta = prepare_delta(delta, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    padded = (length + CHUNK - 1) // CHUNK * CHUNK
    pad = padded - length  # pad the small inputs here so no (.., L, N) tensor is padded below
    dt = F.pad(delta, (0, pad)).view(batch, groups, dim // groups, padded, 1)
    u_ = F.pad(u, (0, pad)).view(batch, groups, dim // groups, padded, 1)
    # (batch, G, 1, L, N): one state-sized row per step, shared by the group's channels
    B_rows = F.pad(B, (0, pad)).transpose(-1, -2).contiguous().unsqueeze(2)
    C_rows = F.pad(C, (0, pad)).transpose(-1, -2).contiguous().unsqueeze(2)
    log_decay = dt * A.view(groups, dim // groups, 1, n_state)  # (batch, G, dim/G, L, N)
    states = scan_states(log_decay, (dt * u_) * B_rows)
    y = (states * C_rows).sum(-1).reshape(batch, dim, padded).narrow(-1, 0, length)
    out = finish_output(y, u, D, z)
    if return_last_state:
        return out, states.select(-2, length - 1).reshape(batch, dim, n_state)
    return out
