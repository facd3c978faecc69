"""MedMNIST v2 / MedMNIST+ ``.npz`` files (2D and 3D, sizes 28, 64, 128, 224) from a local root.

A file holds ``{train,val,test}_{images,labels}``: images ``(N, H, W)`` grey, ``(N, H, W, 3)``
RGB or ``(N, D, H, W)`` volumes, uint8; labels ``(N, 1)``, or for the multi-label ChestMNIST
``(N, 14)`` of 0/1, one column per finding (as any file whose labels have several columns). Files are named ``{name}.npz`` (28) or
``{name}_{size}.npz``. A missing file can be downloaded from the official Zenodo record
(10519652, MedMNIST v3.0 release of the v2 data plus the larger sizes) and its MD5 checked; the
local root comes first and nothing is fetched unless asked (``download=True``).

Examples:
    >>> train = open_medmnist("pneumoniamnist", "train", root="../shared/data/medmnist")
    >>> len(train), train.classes, train.load(0).shape
    (4708, ['normal', 'pneumonia'], (1, 28, 28))
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from ...files import atomic_path
from ..io import nonfinite_text
from .base import SPLITS, ClassificationSource, empty_classes, empty_classes_message

__all__ = ["MEDMNIST", "SIZES_2D", "SIZES_3D", "MedMNISTSource", "open_medmnist", "medmnist_file", "medmnist_url",
           "download_medmnist", "verify_md5", "parse_name", "default_root"]

RECORD = "https://zenodo.org/records/10519652/files"
SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)

_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen")

# name: (task, channels, class names, MD5 of the 28, 64, 128, 224 files; 3D sets have 28 and 64)
MEDMNIST: dict[str, tuple[str, int, tuple[str, ...], tuple[str, ...]]] = {
    "pathmnist": ("multi-class", 3, ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                                     "normal colon mucosa", "cancer-associated stroma",
                                     "colorectal adenocarcinoma epithelium"),
                  ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
                   "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec")),
    "chestmnist": ("multi-label, binary-class", 1, ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass",
                                                    "nodule", "pneumonia", "pneumothorax", "consolidation", "edema",
                                                    "emphysema", "fibrosis", "pleural", "hernia"),
                   ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
                    "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa")),
    "dermamnist": ("multi-class", 3, ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                                      "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                                      "melanocytic nevi", "vascular lesions"),
                   ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
                    "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d")),
    "octmnist": ("multi-class", 1, ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
                 ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
                  "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3")),
    "pneumoniamnist": ("binary-class", 1, ("normal", "pneumonia"),
                       ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
                        "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1")),
    "retinamnist": ("ordinal-regression", 3, ("0", "1", "2", "3", "4"),
                    ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
                     "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348")),
    "breastmnist": ("binary-class", 1, ("malignant", "normal, benign"),
                    ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
                     "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b")),
    "bloodmnist": ("multi-class", 3, ("basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                                      "monocyte", "neutrophil", "platelet"),
                   ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
                    "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601")),
    "tissuemnist": ("multi-class", 1, ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                                       "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                                       "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"),
                    ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
                     "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c")),
    "organamnist": ("multi-class", 1, _ORGANS,
                    ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
                     "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170")),
    "organcmnist": ("multi-class", 1, _ORGANS,
                    ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
                     "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1")),
    "organsmnist": ("multi-class", 1, _ORGANS,
                    ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
                     "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1")),
    "organmnist3d": ("multi-class", 1, ("liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder",
                                        "heart", "lung-right", "lung-left", "spleen", "pancreas"),
                     ("a0c5a1ff56af4f155c46d46fbb45a2fe", "58a2205adf14a9d0a189cb06dc78bf10")),
    "nodulemnist3d": ("binary-class", 1, ("benign", "malignant"),
                      ("8755a7e9e05a4d9ce80a24c3e7a256f3", "c47c5b7d457bf6332200d2ea6d64ecd8")),
    "adrenalmnist3d": ("binary-class", 1, ("normal", "hyperplasia"),
                       ("bbd3c5a5576322bc4cdfea780653b1ce", "17721accfe9fb005146a47d33bc54b2f")),
    "fracturemnist3d": ("multi-class", 1, ("buckle rib fracture", "nondisplaced rib fracture",
                                           "displaced rib fracture"),
                        ("6aa7b0143a6b42da40027a9dda61302f", "f01d7e6316aedf4210da0da5b7437b42")),
    "vesselmnist3d": ("binary-class", 1, ("vessel", "aneurysm"),
                      ("b41fd4f7e7e2feedddb201585ecafa1b", "6bb274a8846e1097066dcd64e2c4520f")),
    "synapsemnist3d": ("binary-class", 1, ("inhibitory synapse", "excitatory synapse"),
                       ("1235b78a3cd6280881dd7850a78eadb6", "43bd14ebf3af9d3dd072446fedc14d5e")),
}


def default_root() -> Path:
    """``$MEDSSM_DATA/medmnist`` (the bundled benchmark files), else ``~/.medssm/medmnist``."""
    if os.environ.get("MEDSSM_DATA"):
        return Path(os.environ["MEDSSM_DATA"]) / "medmnist"
    return Path.home() / ".medssm" / "medmnist"


def parse_name(text: str) -> tuple[str, int] | None:
    """``"pneumoniamnist"`` -> ("pneumoniamnist", 28); ``"breastmnist_64"`` -> ("breastmnist", 64);
    None if ``text`` (or a file's stem) is not a MedMNIST dataset."""
    stem = Path(text).name
    stem = stem[:-4] if stem.lower().endswith(".npz") else stem
    m = re.fullmatch(r"([a-z0-9]+?)(?:_(\d+))?", stem.lower())
    if not m or m.group(1) not in MEDMNIST:
        return None
    return m.group(1), int(m.group(2) or 28)


def _sizes(name: str) -> tuple[int, ...]:
    return SIZES_3D if name.endswith("3d") else SIZES_2D


def _md5_of(name: str, size: int) -> str:
    sizes = _sizes(name)
    if size not in sizes:
        raise ValueError(f"{name} comes in sizes {', '.join(map(str, sizes))}, not {size}")
    return MEDMNIST[name][3][sizes.index(size)]


def medmnist_file(name: str, size: int = 28) -> str:
    _md5_of(name, size)
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def medmnist_url(name: str, size: int = 28) -> str:
    return f"{RECORD}/{medmnist_file(name, size)}?download=1"


def verify_md5(path: str | os.PathLike, expected: str) -> None:
    """Raise ``ValueError`` naming the file if its MD5 is not ``expected``."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected.lower():
        raise ValueError(f"{path}: MD5 {h.hexdigest()} does not match the official {expected}; the file is "
                         "corrupt or not the MedMNIST release (delete it and download again)")


def download_medmnist(name: str, size: int = 28, root: str | os.PathLike | None = None) -> Path:
    """Fetch ``name`` at ``size`` from the official Zenodo record into ``root``, check its MD5 and
    only then move it into place. Returns the file's path."""
    from tqdm import tqdm

    root = Path(root) if root is not None else default_root()
    target = root / medmnist_file(name, size)
    url, md5 = medmnist_url(name, size), _md5_of(name, size)
    with atomic_path(target) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {target.name}") as bar:
                    for chunk in iter(lambda: r.read(1 << 20), b""):
                        f.write(chunk)
                        bar.update(len(chunk))
        except OSError as e:
            raise ConnectionError(f"could not download {url} ({e}); put {target.name} into {root} by hand") from e
        verify_md5(tmp, md5)
    return target


def _read_npz(path: Path, keys: list[str], optional: list[str] = ()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of ``path``, and those of ``optional`` that it has (only these are read:
    the 224 files are large)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise KeyError(missing[0], sorted(z.files))
            return {k: z[k] for k in [*keys, *optional] if k in z.files}
    except KeyError as e:
        raise ValueError(f"{path}: missing array {e.args[0]!r}; a MedMNIST file holds "
                         f"{{train,val,test}}_{{images,labels}}, this one has {e.args[1]}") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e


class MedMNISTSource(ClassificationSource):
    """One split of a MedMNIST-layout ``.npz`` (held in memory as uint8).

    Args:
        path: the ``.npz`` file.
        split: ``train``, ``val``, ``test`` or ``all`` (the three concatenated).
        name: the MedMNIST dataset (class names, task); taken from the file name when it is one.
        spatial_dims: 2 or 3; by default 3 for ``*3d`` datasets and 4-D image arrays whose last axis
            is not 1 or 3 (channels), else 2.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", name: str | None = None,
                 spatial_dims: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such .npz file")
        parsed = parse_name(self.path.name)
        self.dataset = name or (parsed[0] if parsed else None)
        if split not in SPLITS and split != "all":
            raise ValueError(f"split must be one of {', '.join(SPLITS)} or 'all', got {split!r}")
        info = MEDMNIST.get(self.dataset or "")
        splits = SPLITS if split == "all" else (split,)
        arrays = _read_npz(self.path, [f"{s}_{k}" for s in splits for k in ("images", "labels")],
                           optional=[f"{s}_labels" for s in SPLITS if s not in splits])
        labels = {s: self._check_labels_array(s, arrays[f"{s}_labels"]) for s in SPLITS if f"{s}_labels" in arrays}
        images = [arrays[f"{s}_images"] for s in splits]
        self._offsets = np.cumsum([0] + [len(x) for x in images])
        self._splits = splits
        for s, x in zip(splits, images):
            self._check_images(s, x, labels[s])
        multi = any(y.ndim == 2 for y in labels.values())
        if multi:
            self.classes = list(info[2]) if info else [str(i) for i in range(next(iter(labels.values())).shape[1])]
        else:
            self.classes = list(info[2]) if info else self._classes_from_labels(labels)
        self._check_label_range(labels)
        x = np.concatenate(images) if len(images) > 1 else images[0]
        self.labels = np.concatenate([labels[s] for s in splits])
        if spatial_dims is None:
            is3d = (self.dataset or "").endswith("3d") or (x.ndim == 4 and x.shape[-1] not in (1, 3))
            spatial_dims = 3 if is3d else 2
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if x.ndim == spatial_dims + 1:
            x = x[..., None]  # channels last
        if x.ndim != spatial_dims + 2:
            raise ValueError(f"{self.path}: images of shape {x.shape[1:]} are neither {spatial_dims}D grey "
                             f"nor {spatial_dims}D with channels last")
        self.images = x  # (N, *S, C)
        self.spatial_dims = spatial_dims
        self.in_chans = int(x.shape[-1])
        self.native_size = tuple(int(s) for s in x.shape[1:-1])
        self.description = f"{self.path.name} [{split}]"

    def inputs(self) -> list[Path]:
        return [self.path]

    def _check_labels_array(self, split: str, y: np.ndarray) -> np.ndarray:
        """A split's labels as int64: ``(N,)`` class indices, or ``(N, K)`` 0/1 findings for several
        columns (multi-label); integers, none negative."""
        where = f"{self.path}: {split}_labels"
        if y.dtype.kind not in "ui" and not (y.dtype.kind == "f" and np.all(y == np.round(y))):
            raise ValueError(f"{where} must hold integers, got {y.dtype}")
        y = np.atleast_1d(y)
        y = y.reshape(len(y), -1).astype(np.int64)
        if len(y) and y.min() < 0:
            raise ValueError(f"{where} has a negative label ({int(y.min())})")
        if y.shape[1] == 1:
            return y[:, 0]
        if len(y) and y.max() > 1:
            i, k = (int(v) for v in np.argwhere(y > 1)[0])
            raise ValueError(f"{where} has {y.shape[1]} columns (multi-label: 0 or 1 for each finding), but index "
                             f"{i} holds {y[i, k]} in column {k}")
        return y

    def _check_images(self, split: str, x: np.ndarray, y: np.ndarray) -> None:
        where = f"{self.path}: {split}"
        if x.dtype.kind not in "uif":
            raise ValueError(f"{where}_images must hold numbers, got {x.dtype}")
        if len(x) != len(y):
            raise ValueError(f"{where}_images has {len(x)} samples but {split}_labels has {len(y)}")
        if x.ndim not in (3, 4, 5) or len(x) == 0:
            raise ValueError(f"{where}_images has shape {x.shape}; expected (N, H, W), (N, H, W, C) or (N, D, H, W) "
                             "with N > 0")
        if x.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
            if len(bad):
                raise ValueError(f"{where} image at index {bad[0]} has {nonfinite_text(x[bad[0]])}"
                                 + (f" ({len(bad)} images of {split} hold NaN or Inf)" if len(bad) > 1 else ""))

    def _classes_from_labels(self, labels: dict[str, np.ndarray]) -> list[str]:
        """A file of unknown name: classes ``0..max``, each of which must have a sample in some split."""
        k, empty = empty_classes(np.concatenate(list(labels.values())))
        if empty:
            split, i = next((s, int(np.flatnonzero(y > empty[0])[0])) for s, y in labels.items()
                            if (y > empty[0]).any())
            splits = list(labels)
            searched = " or ".join([", ".join(splits[:-1]), splits[-1]] if len(splits) > 1 else splits)
            raise ValueError(empty_classes_message(f"{self.path}: {split} label {labels[split][i]} at index {i}", k,
                                                   empty, searched))
        return [str(i) for i in range(k)]

    def _check_label_range(self, labels: dict[str, np.ndarray]) -> None:
        k = len(self.classes)
        for split, y in labels.items():
            if y.ndim == 2:
                if y.shape[1] != k:
                    raise ValueError(f"{self.path}: {split}_labels has {y.shape[1]} columns; {self.dataset} has {k} "
                                     "findings")
                continue
            bad = np.flatnonzero(y >= k)
            if len(bad):
                raise ValueError(f"{self.path}: {split} label {y[bad[0]]} at index {bad[0]} is out of range for "
                                 f"{k} classes (0..{k - 1})")

    def load(self, i: int) -> np.ndarray:
        x = np.moveaxis(self.images[i], -1, 0)  # (C, *S)
        if x.dtype == np.uint8:
            return x.astype(np.float32) / 255.0
        if x.dtype.kind in "ui":
            return x.astype(np.float32) / float(np.iinfo(x.dtype).max)
        return x.astype(np.float32)

    def name(self, i: int) -> str:
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return f"{self.path.name}:{self._splits[k]}/{i - int(self._offsets[k])}"


def medmnist_path(name: str, size: int = 28, root: str | os.PathLike | None = None, download: bool = False) -> Path:
    """Where ``name`` at ``size`` is under ``root``; downloaded first when missing and ``download``."""
    root = Path(root) if root is not None else default_root()
    path = root / medmnist_file(name, size)
    if path.is_file():
        return path
    if not download:
        raise FileNotFoundError(f"{path}: not found; pass download=True (CLI: --download) to fetch it from "
                                f"{medmnist_url(name, size)}, or put the file there")
    return download_medmnist(name, size, root)


def open_medmnist(data: str | os.PathLike, split: str = "train", *, root: str | os.PathLike | None = None,
                  size: int = 28, download: bool = False) -> MedMNISTSource:
    """A split of a MedMNIST ``.npz`` given as a path, or as a name (``pneumoniamnist``,
    ``breastmnist_64``) looked up in ``root`` at ``size``."""
    p = Path(data)
    if p.suffix.lower() == ".npz":
        if not p.is_file():
            parsed = parse_name(p.name)
            if parsed and download:
                return MedMNISTSource(download_medmnist(parsed[0], parsed[1], p.parent), split)
            raise FileNotFoundError(f"{p}: no such .npz file")
        return MedMNISTSource(p, split)
    parsed = parse_name(str(data))
    if parsed is None:
        raise ValueError(f"{data!r} is neither a .npz file nor a MedMNIST dataset ({', '.join(MEDMNIST)})")
    name, named_size = parsed
    size = named_size if "_" in str(data) else size
    return MedMNISTSource(medmnist_path(name, size, root, download), split, name=name)
