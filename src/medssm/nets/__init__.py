"""Networks: LightM-UNet, SegMamba, MedMamba and MONAI baselines, behind one registry with a card for
each model (importing a family registers its sizes)."""

from . import baselines  # noqa: F401  registers the monai: baselines
from .cards import ModelCard, Recipe
from .checkpointing import checkpointing_enabled, set_checkpointing
from .lightm_unet import LightMUNet
from .medmamba import MedMamba
from .pretrained import load_pretrained
from .registry import build_for_data, create_model, get_model_card, list_models, load_model, register_model, save_model
from .segmamba import SegMamba

__all__ = ["LightMUNet", "MedMamba", "SegMamba", "ModelCard", "Recipe", "create_model", "build_for_data",
           "get_model_card", "list_models", "register_model", "save_model", "load_model", "load_pretrained",
           "set_checkpointing", "checkpointing_enabled"]
