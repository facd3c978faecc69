"""Random selective-scan inputs, shared by the scan tests."""

import torch


def make_inputs(batch=2, dim=4, length=7, n=3, groups=None, with_D=True, with_z=True, with_bias=True,
                dtype=torch.float64, delta_scale=1.0, generator=None, requires_grad=False, step_sizes=False):
    """Inputs for ``selective_scan`` as keyword arguments (B and C grouped when ``groups``).

    ``step_sizes``: delta and delta_bias >= 0, as they must be when no softplus makes them step sizes
    (a negative step makes the state grow exponentially: no Mamba computes that)."""
    g = generator
    r = lambda *s: torch.randn(*s, dtype=dtype, generator=g)  # noqa: E731
    bc_shape = (batch, n, length) if groups is None else (batch, groups, n, length)
    kw = dict(
        u=r(batch, dim, length),
        delta=r(batch, dim, length) * delta_scale,
        A=-torch.rand(dim, n, dtype=dtype, generator=g) * 2 - 0.1,
        B=r(*bc_shape),
        C=r(*bc_shape),
        D=r(dim) if with_D else None,
        z=r(batch, dim, length) if with_z else None,
        delta_bias=r(dim) if with_bias else None,
    )
    if step_sizes:
        kw["delta"] = kw["delta"].abs()
        kw["delta_bias"] = None if kw["delta_bias"] is None else kw["delta_bias"].abs()
    if requires_grad:
        for v in kw.values():
            if v is not None:
                v.requires_grad_(True)
    return kw
