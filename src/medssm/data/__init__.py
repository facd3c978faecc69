"""medssm.data: reading images (:mod:`.io`, both tasks), segmentation datasets
(:mod:`.segmentation`: nnU-Net raw datasets, planning, preprocessing, sampling, augmentation) and
classification datasets (:mod:`.classification`: MedMNIST, image folders, CSV)."""

from .io import SUPPORTED_ENDINGS, Geometry, ImageFileError, read_channels, read_image, write_image

__all__ = ["SUPPORTED_ENDINGS", "Geometry", "ImageFileError", "read_channels", "read_image", "write_image"]
