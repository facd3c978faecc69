"""Selective state-space building blocks: the scan and its backends, the Mamba layer, token orders."""

from .backends import available_backends, current_backend, resolve_backend, use_backend
from .mamba import Mamba
from .orders import (CROSS_SCAN_2D, CROSS_SCAN_3D, ORDERS, cross_merge, cross_scan, from_order,
                     image_to_tokens, to_order, tokens_to_image)
from .scan import count_scan_flops, scan_flops, selective_scan

__all__ = ["Mamba", "selective_scan", "count_scan_flops", "scan_flops", "available_backends", "resolve_backend",
           "use_backend", "current_backend", "ORDERS", "CROSS_SCAN_2D", "CROSS_SCAN_3D", "to_order", "from_order",
           "image_to_tokens", "tokens_to_image", "cross_scan", "cross_merge"]
