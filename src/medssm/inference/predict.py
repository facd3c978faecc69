"""``medssm predict -i IN -o OUT -m RUN``: every image of IN to a label map in OUT, in the same file
format and geometry (spacing, origin, direction), via the run's preprocessing, a Gaussian-blended
sliding window, optional mirror test-time augmentation and optional probabilities.

Never writes into IN; an existing output is replaced only with ``--overwrite`` (checked for every
case before the first prediction); each output is written atomically.

Example:
    medssm predict -i ../shared/data/Dataset002_Hippocampus/imagesTr -o preds -m runs/hippo --mirror
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path


@dataclasses.dataclass
class PredictConfig:
    """Predict label maps for a folder of images with a trained run."""

    input: str = dataclasses.field(metadata={"flags": ("-i", "--input"), "help": (
        "folder of images: nnU-Net naming ({case}_0000.nii.gz, one file per channel) or plain files")})
    output: str = dataclasses.field(metadata={"flags": ("-o", "--output"), "help": "output folder"})
    model: str = dataclasses.field(metadata={"flags": ("-m", "--model"), "help": (
        "run folder of medssm train (or one of its checkpoint folders)")})
    checkpoint: str = dataclasses.field(default="best", metadata={"help": "best or last"})
    mirror: bool = dataclasses.field(default=False, metadata={"help": "mirror test-time augmentation (2^d flips)"})
    save_probabilities: bool = dataclasses.field(default=False, metadata={
        "help": "also write {case}.npz with the class probabilities on the image's grid"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace existing outputs"})
    overlap: float = dataclasses.field(default=0.5, metadata={"help": "sliding-window overlap"})
    batch_size: int = dataclasses.field(default=1, metadata={"help": "windows per forward pass"})
    cases: tuple[str, ...] | None = dataclasses.field(default=None, metadata={
        "help": "predict only these case ids (default: all in the input folder)"})
    progress: bool = True


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def plan_outputs(cfg: PredictConfig, file_ending: str | None = None) -> dict[str, tuple[list[Path], Path]]:
    """``{case: (input files, output file)}``, after every check that can be made before writing."""
    from ..data.io import file_ending as ending_of
    from ..data.nnunet import find_cases

    inp, out = Path(cfg.input), Path(cfg.output)
    if _inside(out, inp):
        raise ValueError(f"{out}: the output folder must not be the input folder or inside it ({inp})")
    cases = find_cases(inp, file_ending)
    if cfg.cases:
        unknown = [c for c in cfg.cases if c not in cases]
        if unknown:
            raise KeyError(f"{inp}: no images for case(s) {', '.join(unknown)}")
        cases = {c: cases[c] for c in cfg.cases}
    jobs = {case: (files, out / f"{case}{ending_of(files[0])}") for case, files in cases.items()}
    existing = [str(o) for _, o in jobs.values() if o.exists()]
    if cfg.save_probabilities:
        existing += [str(out / f"{c}.npz") for c in jobs if (out / f"{c}.npz").exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{len(existing)} output(s) exist, e.g. {existing[0]}; pass --overwrite to replace them")
    return jobs


def read_case_image(files: list[Path], num_channels: int):
    """``(image (C, *S) float32, geometry)`` from a case's channel files; errors name the file."""
    from ..data.io import read_channels

    arrays, geometry = [], None
    for f in files:
        a, g = read_channels(f)
        if geometry is not None and tuple(g.shape) != tuple(geometry.shape):
            raise ValueError(f"{f}: shape {g.shape} differs from {files[0].name}'s {geometry.shape}")
        geometry = geometry or g
        arrays.append(a.astype(np.float32, copy=False))
    image = np.concatenate(arrays, axis=0)
    if image.shape[0] != num_channels:
        raise ValueError(f"{files[0]}: {image.shape[0]} channel(s), the model was trained on {num_channels}")
    return image, geometry


def predict_case(model: torch.nn.Module, plan, image: np.ndarray, geometry, *, mirror: bool = False,
                 overlap: float = 0.5, batch_size: int = 1, device="cpu") -> np.ndarray:
    """Class probabilities ``(K, *S)`` on the image's own grid for one image ``(C, *S)``."""
    from ..data.preprocess import preprocess_case, revert_to_original
    from .sliding import sliding_window_probabilities

    image_pp, _, props = preprocess_case(image, geometry, plan)
    probs = sliding_window_probabilities(model, torch.from_numpy(image_pp), plan.patch_size, overlap=overlap,
                                         mirror=mirror, batch_size=batch_size, device=device)
    return revert_to_original(probs.numpy(), props)


def predict(cfg: PredictConfig) -> Path:
    """Predict every case; returns the output folder."""
    from tqdm import tqdm

    from ..data.io import write_image
    from ..data.plan import Plan
    from ..engine.train import checkpoint_dir, load_trained

    ckpt = checkpoint_dir(cfg.model, cfg.checkpoint)
    model, meta = load_trained(ckpt)
    if meta.get("task", "segmentation") != "segmentation" or "plan" not in meta:
        raise ValueError(f"{ckpt / 'model.json'}: not a segmentation run of medssm train (no plan in it)")
    plan = Plan.from_dict(meta["plan"], str(ckpt / "model.json"))
    jobs = plan_outputs(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if plan.num_classes <= 256 else np.uint16
    for case, (files, target) in tqdm(jobs.items(), desc="predict", unit="case", disable=not cfg.progress):
        image, geometry = read_case_image(files, plan.num_channels)
        probs = predict_case(model, plan, image, geometry, mirror=cfg.mirror, overlap=cfg.overlap,
                             batch_size=cfg.batch_size)
        write_image(probs.argmax(0).astype(dtype), geometry, target)
        if cfg.save_probabilities:
            with atomic_path(out / f"{case}.npz") as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, probabilities=probs.astype(np.float32), labels=np.array(list(plan.labels)))
    print(f"{len(jobs)} case(s) predicted with {ckpt} -> {out}")
    return out


def predict_folder(run: str | os.PathLike, input: str | os.PathLike, output: str | os.PathLike, **kwargs) -> Path:
    """Python shortcut: ``predict_folder(RUN, IN, OUT, mirror=True)``."""
    return predict(PredictConfig(input=str(input), output=str(output), model=str(run), **kwargs))
