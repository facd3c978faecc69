"""The ``reference`` backend: the selective scan as a sequential loop over L, the float64 oracle every
other backend is tested against, and the small steps the PyTorch backends share."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import register_backend


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
