"""Reading and writing medical images with their geometry (SimpleITK underneath).

Arrays are in numpy axis order: a 3D image is ``(z, y, x)``, a 2D one ``(y, x)``. :class:`Geometry`
is in the same order, i.e. SimpleITK's reversed: ``spacing[0]`` is the spacing of array axis 0,
``origin`` and the rows and columns of ``direction`` are reversed too, so ``direction[i][j]`` is the
``i``-th physical coordinate (in reversed order) of array axis ``j``.

Files with one value per pixel read as a spatial array ``(*S)``; files with several components per
pixel (RGB/RGBA PNG, JPG, TIFF) read as ``(C, *S)``, channel first. ``len(geometry.spacing)`` always
gives the number of spatial axes, so the two cases can be told apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ..files import atomic_path

SUPPORTED_ENDINGS: tuple[str, ...] = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl.gz", ".gipl",
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp",
)
NATURAL_IMAGE_ENDINGS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")


class ImageFileError(ValueError):
    """An image file that cannot be read or written; the message names the file."""


def file_ending(path: str | os.PathLike) -> str:
    """The supported ending of ``path`` (``.nii.gz`` counts as one), lower case, or ValueError."""
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    raise ImageFileError(f"{path}: unsupported file type; supported endings: {', '.join(SUPPORTED_ENDINGS)}")


@dataclass(frozen=True)
class Geometry:
    """Where an image lies in space, in numpy axis order. ``shape`` is the spatial shape."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[tuple[float, ...], ...]
    shape: tuple[int, ...]

    @classmethod
    def from_sitk(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        n = image.GetDimension()
        d = np.asarray(image.GetDirection(), dtype=float).reshape(n, n)[::-1, ::-1]
        return cls(spacing=tuple(float(s) for s in image.GetSpacing()[::-1]),
                   origin=tuple(float(o) for o in image.GetOrigin()[::-1]),
                   direction=tuple(tuple(float(v) for v in row) for row in d),
                   shape=tuple(int(s) for s in image.GetSize()[::-1]))

    @classmethod
    def default(cls, shape: tuple[int, ...]) -> Geometry:
        """Unit spacing, zero origin, identity direction."""
        n = len(shape)
        return cls((1.0,) * n, (0.0,) * n, tuple(tuple(float(i == j) for j in range(n)) for i in range(n)),
                   tuple(int(s) for s in shape))

    def apply_to(self, image: sitk.Image) -> None:
        """Set spacing, origin and direction of a SimpleITK image."""
        image.SetSpacing(self.spacing[::-1])
        image.SetOrigin(self.origin[::-1])
        image.SetDirection(np.asarray(self.direction, dtype=float)[::-1, ::-1].ravel().tolist())

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": [list(r) for r in self.direction], "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(tuple(map(float, d["spacing"])), tuple(map(float, d["origin"])),
                   tuple(tuple(map(float, r)) for r in d["direction"]), tuple(map(int, d["shape"])))

    def matches(self, other: Geometry, tol: float = 1e-4) -> bool:
        """Same shape, and spacing, origin and direction equal within ``tol`` (relative for spacing)."""
        return not self.differences(other, tol)

    def differences(self, other: Geometry, tol: float = 1e-4) -> list[tuple[str, str, str]]:
        """``(what, self's value, other's value)`` for each of shape, spacing, origin and direction
        that differs (beyond ``tol``), the values written in ITK/NIfTI order (x, y, z), as a viewer
        shows them: ``("spacing", "(2, 1, 1)", "(1, 1, 1)")``."""
        if len(self.shape) != len(other.shape):
            return [("shape", _itk_text(self.shape), _itk_text(other.shape))]
        same = {"shape": self.shape == other.shape,
                "spacing": np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol),
                "origin": np.allclose(self.origin, other.origin, rtol=tol, atol=tol),
                "direction": np.allclose(self.direction, other.direction, atol=tol)}
        return [(what, _itk_text(getattr(self, what)), _itk_text(getattr(other, what)))
                for what, equal in same.items() if not equal]


def itk_axes(ndim: int) -> str:
    """The axis names of ITK/NIfTI order for ``ndim`` spatial axes: ``"x, y, z"``, ``"x, y"``."""
    return ", ".join("xyzt"[:ndim])


def format_number(value: float) -> str:
    """A number as a person writes it: ``2`` for 2.0, ``-0.5``, ``0.703125`` (exact, no rounding)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def nonfinite_text(array: np.ndarray) -> str | None:
    """``"3 NaN and 1 Inf values"`` when a float array holds any, else None."""
    array = np.asarray(array)
    if array.dtype.kind not in "fc" or np.all(np.isfinite(array)):
        return None
    return f"{int(np.count_nonzero(np.isnan(array)))} NaN and {int(np.count_nonzero(np.isinf(array)))} Inf values"


def _itk_text(values) -> str:
    """A vector or (direction) a matrix in numpy order, written in ITK order: ``(2, 1, 1)``."""
    array = np.asarray(values, dtype=float)
    if array.ndim == 2:  # rows and columns both reversed
        return "(" + ", ".join(_vector_text(row) for row in array[::-1, ::-1]) + ")"
    return _vector_text(array[::-1])


def _vector_text(values) -> str:
    return "(" + ", ".join(format_number(v) for v in values) + ")"


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read one image file: ``(*S)`` for one value per pixel, ``(C, *S)`` for RGB and other
    multi-component pixels. The dtype is the file's. Raises :class:`ImageFileError` naming the file.

    NIfTI voxels are read with nibabel (SimpleITK 2.5 turns NaN and Inf into numbers), the geometry
    with SimpleITK, so it is in ITK's (LPS) convention for every format."""
    path = Path(path)
    ending = file_ending(path)
    if not path.is_file():
        raise ImageFileError(f"{path}: file not found")
    try:
        if ending in (".nii", ".nii.gz"):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            if reader.GetNumberOfComponents() == 1:
                array = np.asanyarray(nib.load(path).dataobj)
                if array.ndim == reader.GetDimension():
                    return np.ascontiguousarray(array.transpose()), Geometry.from_sitk(reader)
        image = sitk.ReadImage(str(path))
    except Exception as e:  # SimpleITK, nibabel and zlib each raise their own kinds
        raise ImageFileError(f"{path}: unreadable ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})") from None
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = np.moveaxis(array, -1, 0)
    return np.ascontiguousarray(array), Geometry.from_sitk(image)


def read_channels(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Like :func:`read_image` but always channel first: ``(C, *S)``."""
    array, geometry = read_image(path)
    return (array[None] if array.ndim == len(geometry.shape) else array), geometry


def write_image(array: np.ndarray, geometry: Geometry | None, path: str | os.PathLike) -> Path:
    """Write ``array`` (spatial, ``(*S)``) to ``path`` atomically in the format of its ending, with
    ``geometry``'s spacing, origin and direction (PNG/JPG/BMP keep none of these). PNG/BMP take
    integers in 0..65535 (0..255 for JPG/BMP); floats and larger values raise ImageFileError."""
    path = Path(path)
    ending = file_ending(path)
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype == np.float16 or array.dtype.kind not in "iuf":
        raise ImageFileError(f"{path}: cannot write dtype {array.dtype}")
    if geometry is not None and tuple(array.shape) != tuple(geometry.shape):
        raise ImageFileError(f"{path}: array shape {array.shape} does not match geometry shape {geometry.shape}")
    if ending in NATURAL_IMAGE_ENDINGS:
        array = _natural_image_dtype(array, ending, path)
    image = sitk.GetImageFromArray(array)
    if geometry is not None:
        geometry.apply_to(image)
    with atomic_path(path) as tmp:
        # SimpleITK picks the format from the name, so write beside tmp with the real ending.
        named = tmp.with_name(tmp.name + ending)
        try:
            sitk.WriteImage(image, str(named), useCompression=ending.endswith(".gz"))
            os.replace(named, tmp)
        except RuntimeError as e:
            raise ImageFileError(f"{path}: cannot write ({str(e).strip().splitlines()[-1]})") from None
        finally:
            named.unlink(missing_ok=True)
    return path


def _natural_image_dtype(array: np.ndarray, ending: str, path: Path) -> np.ndarray:
    if array.ndim != 2:
        raise ImageFileError(f"{path}: {ending} holds 2D images only, got shape {array.shape}")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ImageFileError(f"{path}: {ending} holds integers only; got non-integer values")
    top = 65535 if ending == ".png" else 255
    if array.size and (array.min() < 0 or array.max() > top):
        raise ImageFileError(f"{path}: values {array.min()}..{array.max()} do not fit {ending} (0..{top})")
    return array.astype(np.uint8 if array.size == 0 or array.max() <= 255 else np.uint16)


def label_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{case: path}`` for every image file in ``folder`` (case = file name without its ending)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            try:
                out[p.name[: -len(file_ending(p))]] = p
            except ImageFileError:
                continue
    return out


def images_beside(ref: Path) -> Path | None:
    """The image folder of a label folder: ``imagesTs`` beside ``labelsTs``, ``imagesTr`` beside
    ``labelsTr`` (any ``labelsXx``); None for another name."""
    return ref.parent / ("images" + ref.name[len("labels"):]) if ref.name.startswith("labels") else None


def first_channel_files(folder: Path | None) -> dict[str, Path]:
    """``{case: image}`` of an image folder: ``{case}_0000{ending}`` (an nnU-Net channel file) or
    ``{case}{ending}``; empty when there is no folder."""
    if folder is None or not folder.is_dir():
        return {}
    files = label_files(folder)
    plain = {name: path for name, path in files.items() if not name.endswith("_0000")}
    return {**plain, **{name[: -len("_0000")]: path for name, path in files.items() if name.endswith("_0000")}}
