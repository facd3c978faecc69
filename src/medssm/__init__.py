"""medssm: Mamba (selective state-space) networks for medical imaging, on CPU and GPU."""

from .nets import create_model, get_model_card, list_models, load_model, save_model
from .nets.timm_support import register_with_timm

register_with_timm()  # makes timm.create_model("medmamba_t") work when timm is installed

__version__ = "0.1.0"
__all__ = ["create_model", "get_model_card", "list_models", "load_model", "save_model", "__version__"]
