"""Convolutions and instance normalisation that take the CPU's fast paths, with the arithmetic of
torch's own modules (same parameters, same names, so checkpoints load as before).

Measured on the project's 2-core Zen 4 VM (torch 2.13, one thread, SegMamba's shapes;
``benchmarks/models.py --profile``):

- PyTorch runs a float32 convolution on its own im2col kernels (``slow_conv3d``, ``thnn_conv2d``)
  instead of oneDNN when the batch is one, the kernel is at most 3 in its last two axes and
  ``N*C*D*H`` (``N*C*H*W`` in 2D) is at most 20480 (``ConvParams::use_mkldnn`` in
  aten/src/ATen/native/Convolution.cpp: "for some case, native is faster"), and for every 1x1
  convolution when torch runs on one thread. In SegMamba at 48^3-96^3 that is the first convolution
  on 4 channels (below 72^3) and every convolution at 1/8 and 1/16 resolution: 2.5x slower forward
  and up to 5x slower backward per multiply-add than oneDNN there, ~14 % of a step at 48^3. Where
  that would happen, :class:`Conv3d` runs the convolution as a 2-group one on the input given twice
  (``groups > 1`` always takes oneDNN), which computes the same sums: group g holds output channels
  ``g*C_out/2 ...`` and reads all input channels (:class:`ConvTranspose3d` likewise for SegMamba's
  transposed convolutions at 1/16 and 1/8).
- A 1x1 convolution (stride 1) is a matrix product: :class:`Conv3d` computes it as one batched GEMM
  (``baddbmm``), whose backward is two GEMMs (oneDNN's 1x1 backward took 2.5-4.7x its forward).
- ``InstanceNorm3d`` without affine parameters (MONAI's default) goes through ``batch_norm`` on a
  reshaped tensor; ``group_norm`` with one group per channel is the same normalisation, 3x faster
  forward on the CPU (native kernels on (B, C, L) rows).

Where the input is shallower than the kernel, a 3D convolution under bf16 runs in float32
(:func:`medssm.devices.conv3d`: oneDNN's bfloat16 weight gradient is wrong there). Outside the
CPU, while exporting, tracing or under a dispatch mode (FLOP counters), the plain torch operation runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..devices import conv3d
from ..ssm.backends import is_exporting

__all__ = ["Conv2d", "Conv3d", "ConvTranspose2d", "ConvTranspose3d", "InstanceNorm", "conv_forward",
           "conv_transpose_forward"]

ONEDNN_SMALL_LIMIT = 20480  # N*C*D*H at or below which PyTorch prefers its own kernel (batch 1, kernel <= 3)


def _plain(x: torch.Tensor) -> bool:
    """Whether the plain torch op must run: off the CPU, exporting, tracing, compiling, counting."""
    return (x.device.type != "cpu" or is_exporting() or torch.compiler.is_compiling()
            or torch.utils._python_dispatch.is_in_torch_dispatch_mode())


def _avoids_onednn(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether PyTorch would run this float32 convolution on its own slow kernel, not oneDNN."""
    k = conv.kernel_size
    return (x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and x.shape[0] == 1
            and conv.groups == 1 and not (k[-1] > 3 and k[-2] > 3) and conv.out_channels % 2 == 0
            and math.prod(x.shape[:4]) <= ONEDNN_SMALL_LIMIT and torch.backends.mkldnn.is_available())


def _is_pointwise(conv: nn.Module) -> bool:
    return (all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride) and conv.groups == 1
            and all(p == 0 for p in conv.padding) and conv.padding_mode == "zeros")


def conv_forward(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` on the CPU's fast path: 1x1 as a batched GEMM, small float32 maps on oneDNN."""
    if _plain(x) or conv.padding_mode != "zeros":
        return conv._conv_forward(x, conv.weight, conv.bias)
    if _is_pointwise(conv):
        rows = x.flatten(2)  # (B, C_in, L)
        weight = conv.weight.flatten(1).expand(x.shape[0], -1, -1)  # (B, C_out, C_in), a view
        if conv.bias is None:
            out = torch.bmm(weight, rows)
        else:
            out = torch.baddbmm(conv.bias[:, None], weight, rows)  # (B, C_out, L)
        return out.unflatten(2, x.shape[2:])
    if _avoids_onednn(conv, x):
        functional = F.conv3d if x.dim() == 5 else F.conv2d
        return functional(torch.cat((x, x), 1), conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, 2)
    if x.dim() == 5:
        return conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return conv._conv_forward(x, conv.weight, conv.bias)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters) computed by :func:`conv_forward`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_forward(self, x)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters) computed by :func:`conv_forward`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_forward(self, x)


def conv_transpose_forward(conv: nn.ConvTranspose2d | nn.ConvTranspose3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a transposed convolution, on oneDNN where PyTorch would take its own slow kernel
    (the same rule as :func:`conv_forward`): two groups over the input given twice, the weight's
    output channels split between them (group g: ``weight[:, g*C_out/2 ...]``)."""
    if _plain(x) or conv.padding_mode != "zeros" or not _avoids_onednn(conv, x):
        return conv._conv_forward_plain(x)
    half = conv.out_channels // 2
    weight = torch.cat((conv.weight[:, :half], conv.weight[:, half:]), 0)  # (2 C_in, C_out / 2, *k)
    functional = F.conv_transpose3d if x.dim() == 5 else F.conv_transpose2d
    return functional(torch.cat((x, x), 1), weight, conv.bias, conv.stride, conv.padding, conv.output_padding, 2,
                      conv.dilation)


class ConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` (same parameters) computed by :func:`conv_transpose_forward`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_transpose_forward(self, x)

    def _conv_forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (same parameters) computed by :func:`conv_transpose_forward`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_transpose_forward(self, x)

    def _conv_forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class InstanceNorm(nn.Module):
    """Instance normalisation without affine parameters or running statistics (``nn.InstanceNorm3d``
    as MONAI and SegMamba's authors use it), for 2D and 3D maps: on the CPU as ``group_norm`` with
    one group per channel (the same statistics, 3x faster), elsewhere as ``instance_norm``."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain(x):
            return F.instance_norm(x, eps=self.eps)
        return F.group_norm(x, x.shape[1], eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}"
