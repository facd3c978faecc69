"""Networks: LightM-UNet, SegMamba, MedMamba, behind one registry."""

from .medmamba import MedMamba
from .segmamba import SegMamba
from .registry import create_model, list_models, load_model, register_model, save_model

__all__ = ["MedMamba", "SegMamba", "create_model", "list_models", "register_model", "save_model", "load_model"]
