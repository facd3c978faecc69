"""medssm: Mamba (selective state-space) networks for medical imaging, on CPU and GPU."""

from .nets import create_model, list_models, load_model, save_model

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_model", "save_model", "__version__"]
