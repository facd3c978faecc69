"""The selective scan as Triton kernels: the GPU fast path when ``mamba_ssm`` is not installed.

A plain ``pip install torch`` on a CUDA machine brings Triton with it, so this backend needs
nothing compiled ahead of time. It registers itself as ``"triton"`` only when ``import triton``
works; without Triton this module imports cleanly and registers nothing.

How it works (details in ``docs/explanation/gpu-scan.md``):

- One Triton program per (batch, group of B/C, block of ``BLOCK_D`` channels of that group). It
  walks L in order and keeps the state ``h`` of its ``BLOCK_D x N`` (channel, state) pairs in
  registers, accumulating in float32 (float64 when the inputs are float64).
- Forward: ``delta_bias`` and softplus are applied in the kernel; ``y_t = C_t . h_t + D u_t``,
  gated by ``silu(z_t)``. When a gradient will be needed, the forward also stores the state at the
  start of every chunk of ``chunk`` steps (a checkpoint, ``(batch, dim, L/chunk, N)``).
- Backward: the same programs walk the chunks from last to first. For each chunk they recompute
  its states from the checkpoint into a small per-program scratch buffer, then walk the chunk
  backwards with the adjoint state ``g_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}``
  (started from the gradient of the last state, if any), producing du, ddelta, dz, and per-program
  partial sums of dA, dD, ddelta_bias (PyTorch sums them over the batch) and, summed over the
  block's channels, dB and dC, which the channel blocks of a group add atomically (or, when
  determinism is asked for, store per block for PyTorch to sum).

On CPU tensors the kernels only run under Triton's interpreter (``TRITON_INTERPRET=1`` set
before Triton is imported); that is how the test suite checks them against the reference.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .backends import register_backend

try:
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a Triton install that fails to load
    triton = None
    tl = None
    TRITON_IMPORT_ERROR: Exception | None = exc
else:
    TRITON_IMPORT_ERROR = None

DEFAULT_CHUNK = 64  # steps between two forward checkpoints (and the backward's scratch length)


if triton is not None:

    @triton.jit
    def _log1p(e):
        # log(1 + e) to a few ulp for e >= 0 (Goldberg's trick: w - 1 is exact, the ratio corrects
        # the rounding of w = 1 + e); Triton has no portable log1p.
        w = 1.0 + e
        den = tl.where(w == 1.0, 1.0, w - 1.0)
        return tl.where(w == 1.0, e, tl.log(w) * (e / den))

    @triton.jit
    def _softplus(x):
        # log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)): no overflow, no cancellation.
        return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))

    @triton.jit
    def _program_block(pid, A_ptr, D_ptr, bias_ptr, dim, L, G, N, n_dblocks,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
        # The channel block of program pid: its batch, group, block index, channels d and masks,
        # A (padding lanes read 0, so their state stays 0), D, the step bias, and the offsets row of
        # (b, d, t=0) in u/delta/z/out and bc_row of (b, g, n, t=0) in B/C.
        j = pid % n_dblocks  # channel block within the group
        g = (pid // n_dblocks) % G
        b = (pid // n_dblocks // G).to(tl.int64)
        cpg = dim // G  # channels per group
        offs_j = j * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_j < cpg
        d = g * cpg + offs_j  # (BLOCK_D,) channel indices
        n = tl.arange(0, BLOCK_N)
        mask_n = n < N
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(ACC)  # (BD, BN)
        Dv = tl.zeros([BLOCK_D], dtype=ACC)
        if HAS_D:
            Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(ACC)
        bias = tl.zeros([BLOCK_D], dtype=ACC)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(ACC)
        row = (b * dim + d) * L
        bc_row = ((b * G + g) * N + n) * L
        return b, g, j, d, n, mask_d, mask_n, mask_dn, A, Dv, bias, row, bc_row

    @triton.jit
    def _load_step(u_ptr, delta_ptr, B_ptr, row, bc_row, t, mask_d, mask_n, bias,
                   HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
        # Step t's inputs: u_t, the step size before softplus (bias added) and after, B_t.
        u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(ACC)
        dt_raw = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(ACC)
        if HAS_BIAS:
            dt_raw = dt_raw + bias
        dt = dt_raw
        if SOFTPLUS:
            dt = _softplus(dt_raw)
        B_t = tl.load(B_ptr + bc_row + t, mask=mask_n, other=0.0).to(ACC)
        return u_t, dt_raw, dt, B_t

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
        out_ptr, last_ptr, ckpt_ptr,
        dim, L, G, N, n_dblocks, n_chunks,
        CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        SAVE_CKPT: tl.constexpr, SAVE_LAST: tl.constexpr, ACC: tl.constexpr,
    ):
        b, g, j, d, n, mask_d, mask_n, mask_dn, A, Dv, bias, row, bc_row = _program_block(
            tl.program_id(0), A_ptr, D_ptr, bias_ptr, dim, L, G, N, n_dblocks, BLOCK_D, BLOCK_N, HAS_D, HAS_BIAS, ACC)
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
        for c in range(0, n_chunks):
            if SAVE_CKPT:  # state before step c * CHUNK
                ck = ((b * dim + d[:, None]) * n_chunks + c) * N + n[None, :]
                tl.store(ckpt_ptr + ck, h, mask=mask_dn)
            t_end = tl.minimum(c * CHUNK + CHUNK, L)
            for t in range(c * CHUNK, t_end):
                u_t, _, dt, B_t = _load_step(u_ptr, delta_ptr, B_ptr, row, bc_row, t, mask_d, mask_n, bias,
                                             HAS_BIAS, SOFTPLUS, ACC)
                C_t = tl.load(C_ptr + bc_row + t, mask=mask_n, other=0.0).to(ACC)
                a = tl.exp(dt[:, None] * A)
                h = a * h + (dt * u_t)[:, None] * B_t[None, :]
                y = tl.sum(h * C_t[None, :], axis=1) + Dv * u_t  # (BD,)
                if HAS_Z:
                    z_t = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(ACC)
                    y = y * (z_t * tl.sigmoid(z_t))
                tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)
        if SAVE_LAST:
            tl.store(last_ptr + (b * dim + d[:, None]) * N + n[None, :],
                     h.to(last_ptr.dtype.element_ty), mask=mask_dn)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr, dlast_ptr,
        scratch_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
        dim, L, G, N, n_dblocks, n_chunks,
        CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_DLAST: tl.constexpr, ATOMIC_BC: tl.constexpr, ACC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b, g, j, d, n, mask_d, mask_n, mask_dn, A, Dv, bias, row, bc_row = _program_block(
            pid, A_ptr, D_ptr, bias_ptr, dim, L, G, N, n_dblocks, BLOCK_D, BLOCK_N, HAS_D, HAS_BIAS, ACC)
        # dB, dC: summed over the block's channels here, then either added atomically into
        # (batch, G, N, L) or stored as per-block partials (batch, G, n_dblocks, N, L).
        if ATOMIC_BC:
            part_row = bc_row
        else:
            part_row = (((b * G + g) * n_dblocks + j) * N + n) * L
        state_off = (b * dim + d[:, None]) * N + n[None, :]  # (BD, BN) offsets in (batch, dim, N)
        # This program's scratch: CHUNK + 1 tiles of (BLOCK_D, BLOCK_N); tile k holds the state
        # after step t0 + k - 1 of the current chunk (tile 0: the checkpoint).
        slot = BLOCK_D * BLOCK_N
        scr = (scratch_ptr + pid.to(tl.int64) * (CHUNK + 1) * slot
               + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :])
        carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)  # exp(delta_{t+1} A) g_{t+1}
        if HAS_DLAST:
            carry = tl.load(dlast_ptr + state_off, mask=mask_dn, other=0.0).to(ACC)
        dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
        dD_acc = tl.zeros([BLOCK_D], dtype=ACC)
        dbias_acc = tl.zeros([BLOCK_D], dtype=ACC)
        for ci in range(0, n_chunks):
            c = n_chunks - 1 - ci
            t0 = c * CHUNK
            t_end = tl.minimum(t0 + CHUNK, L)
            ck = ((b * dim + d[:, None]) * n_chunks + c) * N + n[None, :]
            h = tl.load(ckpt_ptr + ck, mask=mask_dn, other=0.0)
            tl.store(scr, h)
            # 1. recompute the chunk's states from its checkpoint
            for t in range(t0, t_end):
                u_t, _, dt, B_t = _load_step(u_ptr, delta_ptr, B_ptr, row, bc_row, t, mask_d, mask_n, bias,
                                             HAS_BIAS, SOFTPLUS, ACC)
                h = tl.exp(dt[:, None] * A) * h + (dt * u_t)[:, None] * B_t[None, :]
                tl.store(scr + (t - t0 + 1) * slot, h)
            tl.debug_barrier()
            # 2. walk the chunk backwards; h is h_t, the state after step t
            for i in range(0, t_end - t0):
                t = t_end - 1 - i
                h_prev = tl.load(scr + (t - t0) * slot)
                u_t, dt_raw, dt, B_t = _load_step(u_ptr, delta_ptr, B_ptr, row, bc_row, t, mask_d, mask_n, bias,
                                                  HAS_BIAS, SOFTPLUS, ACC)
                C_t = tl.load(C_ptr + bc_row + t, mask=mask_n, other=0.0).to(ACC)
                dy = tl.load(dout_ptr + row + t, mask=mask_d, other=0.0).to(ACC)  # d(out_t)
                if HAS_Z:
                    z_t = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(ACC)
                    sz = tl.sigmoid(z_t)
                    y = tl.sum(h * C_t[None, :], axis=1) + Dv * u_t  # pre-gate output
                    dz = dy * y * sz * (1.0 + z_t * (1.0 - sz))
                    tl.store(dz_ptr + row + t, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                    dy = dy * z_t * sz  # d(y_t)
                a = tl.exp(dt[:, None] * A)
                gt = carry + dy[:, None] * C_t[None, :]  # dL/dh_t
                gB = gt * B_t[None, :]
                gha = gt * h_prev * a  # dL/d(delta_t A) elementwise
                du = dt * tl.sum(gB, axis=1) + Dv * dy
                ddt = tl.sum(gha * A, axis=1) + u_t * tl.sum(gB, axis=1)
                dA_acc += gha * dt[:, None]
                dD_acc += dy * u_t
                dB_t = tl.sum(gt * (dt * u_t)[:, None], axis=0)  # (BN,)
                dC_t = tl.sum(h * dy[:, None], axis=0)
                if SOFTPLUS:
                    ddt = ddt * tl.sigmoid(dt_raw)
                dbias_acc += ddt
                tl.store(du_ptr + row + t, du.to(du_ptr.dtype.element_ty), mask=mask_d)
                tl.store(ddelta_ptr + row + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
                if ATOMIC_BC:
                    tl.atomic_add(dB_ptr + part_row + t, dB_t.to(dB_ptr.dtype.element_ty), mask=mask_n)
                    tl.atomic_add(dC_ptr + part_row + t, dC_t.to(dC_ptr.dtype.element_ty), mask=mask_n)
                else:
                    tl.store(dB_ptr + part_row + t, dB_t.to(dB_ptr.dtype.element_ty), mask=mask_n)
                    tl.store(dC_ptr + part_row + t, dC_t.to(dC_ptr.dtype.element_ty), mask=mask_n)
                carry = gt * a
                h = h_prev
            tl.debug_barrier()  # the next chunk overwrites the scratch
        tl.store(dA_ptr + state_off, dA_acc.to(dA_ptr.dtype.element_ty), mask=mask_dn)
        tl.store(dD_ptr + b * dim + d, dD_acc.to(dD_ptr.dtype.element_ty), mask=mask_d)
        tl.store(dbias_ptr + b * dim + d, dbias_acc.to(dbias_ptr.dtype.element_ty), mask=mask_d)

    _INTERPRETED = not isinstance(_scan_fwd_kernel, triton.runtime.jit.JITFunction)


def _config(u: torch.Tensor, G: int, N: int, block_d: int | None):
    """Launch shape: (BLOCK_D, BLOCK_N, n_dblocks, num_warps)."""
    batch, dim, _ = u.shape
    cpg = dim // G
    block_n = triton.next_power_of_2(N)
    if block_d is None:
        # Tiles of at most 512 (channel, state) pairs; smaller blocks while the grid has fewer
        # programs than about two per streaming multiprocessor (the scan is latency bound).
        block_d = min(triton.next_power_of_2(cpg), max(1, 512 // block_n))
        sms = torch.cuda.get_device_properties(u.device).multi_processor_count if u.is_cuda else 1
        while block_d > 4 and batch * G * triton.cdiv(cpg, block_d) < 2 * sms:
            block_d //= 2
    elif block_d & (block_d - 1):
        raise ValueError(f"block_d must be a power of two, got {block_d}")
    num_warps = max(1, min(4, block_d * block_n // 128))
    return block_d, block_n, triton.cdiv(cpg, block_d), num_warps


def _acc_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


class _TritonSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk, block_d,
                deterministic):
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D, z, delta_bias = (None if t is None else t.contiguous() for t in (D, z, delta_bias))
        batch, dim, L = u.shape
        G, N = B.shape[1], A.shape[1]
        chunk = max(1, min(chunk, L))
        n_chunks = triton.cdiv(L, chunk)
        block_d, block_n, n_dblocks, num_warps = _config(u, G, N, block_d)
        save_ckpt = any(ctx.needs_input_grad[:8])
        out = torch.empty_like(u)
        last = u.new_empty(batch, dim, N) if return_last_state else u
        ckpt = u.new_empty(batch, dim, n_chunks, N) if save_ckpt else u
        grid = (batch * G * n_dblocks,)
        with torch.cuda.device(u.device) if u.is_cuda else nullcontext():
            _scan_fwd_kernel[grid](
                u, delta, A, B, C, u if D is None else D, u if z is None else z,
                u if delta_bias is None else delta_bias, out, last, ckpt,
                dim, L, G, N, n_dblocks, n_chunks,
                CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n,
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(delta_softplus), SAVE_CKPT=save_ckpt, SAVE_LAST=bool(return_last_state),
                ACC=_acc_dtype(u), num_warps=num_warps,
            )
        if save_ckpt:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
            if deterministic is None:
                deterministic = torch.are_deterministic_algorithms_enabled()
            ctx.cfg = (bool(delta_softplus), chunk, n_chunks, block_d, block_n, n_dblocks, num_warps,
                       n_dblocks > 1 and not deterministic)
        ctx.set_materialize_grads(False)
        if return_last_state:
            return out, last  # last_state is differentiable too, as in the reference
        return out

    @staticmethod
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        softplus, chunk, n_chunks, block_d, block_n, n_dblocks, num_warps, atomic_bc = ctx.cfg
        batch, dim, L = u.shape
        G, N = B.shape[1], A.shape[1]
        dout = torch.zeros_like(u) if dout is None else dout.to(u.dtype).contiguous()
        has_dlast = dlast is not None
        dlast = dlast.to(u.dtype).contiguous() if has_dlast else u
        grid = (batch * G * n_dblocks,)
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        scratch = u.new_empty(grid[0], chunk + 1, block_d, block_n, dtype=acc)
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if z is not None else None
        dA = u.new_empty(batch, dim, N)
        if atomic_bc:  # added into by every channel block of a group
            dB, dC = u.new_zeros(batch, G, 1, N, L), u.new_zeros(batch, G, 1, N, L)
        else:  # one slice per channel block: deterministic, n_dblocks times the memory of B
            dB, dC = u.new_empty(batch, G, n_dblocks, N, L), u.new_empty(batch, G, n_dblocks, N, L)
        dD = u.new_empty(batch, dim)
        dbias = u.new_empty(batch, dim)
        with torch.cuda.device(u.device) if u.is_cuda else nullcontext():
            _scan_bwd_kernel[grid](
                u, delta, A, B, C, u if D is None else D, u if z is None else z,
                u if delta_bias is None else delta_bias, ckpt, dout, dlast, scratch,
                du, ddelta, u if dz is None else dz, dA, dB, dC, dD, dbias,
                dim, L, G, N, n_dblocks, n_chunks,
                CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n,
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=softplus, HAS_DLAST=has_dlast, ATOMIC_BC=atomic_bc, ACC=_acc_dtype(u),
                num_warps=num_warps,
            )
        dA = dA.sum(0)
        dB, dC = dB.sum(2), dC.sum(2)  # over the channel blocks of each group
        dD = dD.sum(0) if D is not None else None
        dbias = dbias.sum(0) if delta_bias is not None else None
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None, None, None


def triton_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, *, chunk: int = DEFAULT_CHUNK, block_d: int | None = None,
                          deterministic: bool | None = None):
    """The Triton scan on prepared inputs (float32/float64, ``B``/``C`` grouped ``(batch, G, N, L)``).

    ``chunk``: steps between the forward's state checkpoints (memory ``batch*dim*N*L/chunk``).
    ``block_d``: channels per program (a power of two; chosen from the shapes when ``None``).
    ``deterministic``: when a group spans several channel blocks, sum their dB/dC contributions
    from per-block buffers (bitwise reproducible, more memory) instead of with atomic adds;
    ``None`` follows ``torch.are_deterministic_algorithms_enabled()``.
    Differentiable in every tensor input, ``last_state`` included.
    """
    if triton is None:
        raise RuntimeError(f"the 'triton' scan backend needs Triton, which failed to import: {TRITON_IMPORT_ERROR}")
    if not u.is_cuda and not _INTERPRETED:
        raise RuntimeError("the 'triton' scan backend runs on CUDA tensors (on CPU only under Triton's "
                           "interpreter, TRITON_INTERPRET=1 set before Triton is imported); "
                           f"got tensors on {u.device}")
    if B.dim() != 4 or C.dim() != 4:
        raise ValueError("B and C must be grouped (batch, G, N, L); use medssm.ssm.selective_scan")
    dtypes = {t.dtype for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    if len(dtypes) != 1:  # the gradients are returned in the inputs' one dtype
        raise ValueError(f"all inputs must share one dtype, got {sorted(map(str, dtypes))}")
    return _TritonSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      return_last_state, chunk, block_d, deterministic)


if triton is not None:

    @register_backend("triton")
    def triton_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        """``selective_scan`` backend ``"triton"``: see the module docstring."""
        return triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
