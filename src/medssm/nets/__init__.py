"""Networks: LightM-UNet, SegMamba, MedMamba, behind one registry."""

from .registry import create_model, list_models, load_model, register_model, save_model

__all__ = ["create_model", "list_models", "register_model", "save_model", "load_model"]
