"""Segmentation data: nnU-Net raw datasets, their integrity check, planning, preprocessing, splits,
patch sampling and augmentation."""

from .nnunet import Case, DatasetError, NnUNetDataset, find_cases, read_case_images, resolve_data, verify_dataset
from .normalization import SCHEMES, normalize, scheme_for_channel
from .plan import Fingerprint, Plan, make_plan, parse_overrides, plan_dataset
from .preprocess import Cache, build_cache, load_cache, preprocess_case, revert_to_original
from .sampling import PatchSampler
from .splits import make_splits, read_or_make_splits, save_splits

__all__ = [
    "Case", "DatasetError", "NnUNetDataset", "find_cases", "read_case_images", "resolve_data", "verify_dataset",
    "SCHEMES", "normalize", "scheme_for_channel",
    "Fingerprint", "Plan", "make_plan", "parse_overrides", "plan_dataset",
    "Cache", "build_cache", "load_cache", "preprocess_case", "revert_to_original",
    "PatchSampler", "make_splits", "read_or_make_splits", "save_splits", "training_transforms",
]


def __getattr__(name):
    # MONAI is slow to import: load the transforms only when asked for.
    if name == "training_transforms":
        from .transforms import training_transforms
        return training_transforms
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
