"""The ``cuda`` backend: ``mamba_ssm``'s fused kernel, registered only when ``mamba_ssm`` imports.

Not tested here (no GPU in CI); it only forwards arguments, so the kernel's own tests cover it.
"""

from __future__ import annotations

from .backends import register_backend

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except (ImportError, OSError):  # not installed, or installed without its CUDA libraries
    selective_scan_fn = None

if selective_scan_fn is not None:

    @register_backend("cuda")
    def cuda_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        """``mamba_ssm.selective_scan_fn`` on GPU tensors (it takes grouped B/C as they come)."""
        if u.device.type != "cuda":
            raise ValueError(f"the 'cuda' scan needs GPU tensors, got {u.device}")
        if B.shape[1] == 1:  # (batch, 1, N, L) -> (batch, N, L), the kernel's ungrouped fast path
            B, C = B[:, 0], C[:, 0]
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
