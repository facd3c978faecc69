"""Networks: LightM-UNet, SegMamba, MedMamba, behind one registry (importing a family registers its sizes)."""

from .lightm_unet import LightMUNet
from .medmamba import MedMamba
from .pretrained import load_pretrained
from .registry import create_model, list_models, load_model, register_model, save_model
from .segmamba import SegMamba

__all__ = ["LightMUNet", "MedMamba", "SegMamba", "create_model", "list_models", "register_model", "save_model",
           "load_model", "load_pretrained"]
