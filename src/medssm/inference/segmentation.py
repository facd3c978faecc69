"""``medssm predict -i IN -o OUT -m RUN``: every image of IN to a label map in OUT, in the same file
format and geometry (spacing, origin, direction), via the run's preprocessing, a Gaussian-blended
sliding window, optional mirror test-time augmentation and optional probabilities.

Never writes into IN; an existing output is replaced only with ``--overwrite`` or kept with
``--skip-existing`` (checked for every case before the first prediction); each output is written
atomically, so an interrupted prediction leaves only complete files. Beside the label maps,
``OUT/predictions.json`` records the run, checkpoint and mirroring that made them (``medssm evaluate``
names them in its summary and report).

Example:
    medssm predict -i ../shared/data/Dataset002_Hippocampus/imagesTr -o preds -m runs/hippo --mirror
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..devices import autocast, check_precision, cpu_threads, resolve_device
from ..files import atomic_path, guard_outputs, output_folder, write_json
from ..runs import load_run
from ..ssm import use_backend

__all__ = ["PredictConfig", "predict", "predict_case", "predict_folder"]


@dataclasses.dataclass
class PredictConfig:
    """Predict label maps for a folder of images with a trained run."""

    input: str = dataclasses.field(metadata={"flags": ("-i", "--input"), "help": (
        "folder of images: nnU-Net naming ({case}_0000.nii.gz, one file per channel) or plain files")})
    output: str = dataclasses.field(metadata={"flags": ("-o", "--output"), "help": "output folder"})
    model: str = dataclasses.field(metadata={"flags": ("-m", "--model", "--run"), "help": (
        "run folder of medssm train (or one of its checkpoint folders)")})
    checkpoint: str = dataclasses.field(default="best", metadata={"help": "best or last"})
    mirror: bool | None = dataclasses.field(default=None, metadata={"help": (
        "mirror test-time augmentation (2^d flips) (default: as the run's recipe says: off for LightM-UNet's, on for "
        "SegMamba's, nnU-Net's and the short recipe)")})
    save_probabilities: bool = dataclasses.field(default=False, metadata={
        "help": "also write {case}.npz with the probabilities on the image's grid: of each class, or of each region "
                "(with their names)"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace existing outputs"})
    skip_existing: bool = dataclasses.field(default=False, metadata={
        "help": "keep existing outputs and predict the rest (outputs are written atomically: existing ones are complete)"})
    skip_bad: bool = dataclasses.field(default=False, metadata={"help": (
        "predict the cases that can be read and list the others at the end (exit 2) instead of checking every "
        "input first and predicting nothing when one is bad")})
    mirror_axes: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"help": (
        "with mirroring, the spatial axes to flip, numpy order (e.g. 1 2: not the first; default: all)")})
    overlap: float = dataclasses.field(default=0.5, metadata={"help": "sliding-window overlap"})
    batch_size: int | None = dataclasses.field(default=None, metadata={"help": (
        "windows per forward pass (default: as many as hold 64³ voxels, at most the run's training batch)")})
    precision: str = dataclasses.field(default="fp32", metadata={"help": (
        "fp32, bf16 or fp16 (the network under autocast; bf16 pays on CPUs with AVX512-BF16 or AMX, fp16 on GPUs)")})
    accumulate: str = dataclasses.field(default="float32", metadata={"help": (
        "dtype of the case-sized accumulator of the sliding window: float32, or float16 to halve it (large 3D cases)")})
    cases: tuple[str, ...] | None = dataclasses.field(default=None, metadata={
        "help": "predict only these case ids (default: all in the input folder)"})
    device: str = dataclasses.field(default="auto", metadata={
        "help": "cpu, cuda, cuda:N, mps or auto (the kind of device the run was trained on when present here)"})
    scan_backend: str = dataclasses.field(default="auto", metadata={
        "help": "selective-scan implementation: auto, fused (CPU), chunked, triton, cuda, reference"})
    threads: int | None = dataclasses.field(default=None, metadata={"help": (
        "CPU threads for torch and the numba kernels (default: torch's, one per core); fewer on a busy machine")})
    progress: bool = True


def plan_outputs(cfg: PredictConfig) -> dict[str, tuple[list[Path], list[Path]]]:
    """``{case: (input files, output files)}`` of the cases to predict, after every check that can be
    made before writing (existing outputs skipped with ``--skip-existing``)."""
    from ..data.io import file_ending
    from ..data.segmentation.nnunet import find_cases

    inp, out = Path(cfg.input), Path(cfg.output)
    cases = find_cases(inp)
    if cfg.cases:
        unknown = [c for c in cfg.cases if c not in cases]
        if unknown:
            raise ValueError(f"{inp}: no images for case(s) {', '.join(unknown)}")
        cases = {c: cases[c] for c in cfg.cases}
    jobs = {case: (files, [out / f"{case}{file_ending(files[0])}"]
                   + ([out / f"{case}.npz"] if cfg.save_probabilities else []))
            for case, files in cases.items()}
    skip = guard_outputs([o for _, outs in jobs.values() for o in outs], [inp], overwrite=cfg.overwrite,
                         skip_existing=cfg.skip_existing)
    return {case: (files, outs) for case, (files, outs) in jobs.items() if not set(outs) <= skip}


def predict_case(model: torch.nn.Module, plan, image: np.ndarray, geometry, *, mirror: bool = False,
                 mirror_axes=None, overlap: float = 0.5, batch_size: int | None = None, device="cpu", precision: str = "fp32",
                 accumulate: torch.dtype = torch.float32, progress: bool = False) -> np.ndarray:
    """Probabilities ``(K, *S)`` on the image's own grid for one image ``(C, *S)``: of each class, or of
    each region (``plan.label_set.to_label_map`` makes the label map of either). ``batch_size`` windows a
    forward pass (default: :func:`~medssm.inference.sliding.window_batch` of the plan)."""
    from ..data.segmentation.preprocess import preprocess_case, revert_to_original
    from .sliding import sliding_window_probabilities, window_batch

    labels = plan.label_set
    image_pp, _, props = preprocess_case(image, geometry, plan)
    with autocast(torch.device(device), precision):
        probs = sliding_window_probabilities(model, torch.from_numpy(image_pp), plan.patch_size, overlap=overlap,
                                             mirror=mirror, mirror_axes=mirror_axes,
                                             batch_size=batch_size if batch_size is not None else window_batch(plan.patch_size, plan.batch_size),
                                             device=device, activation=labels.activation, accumulate=accumulate,
                                             progress=progress)
    return revert_to_original(probs.numpy(), props, background=not labels.has_regions)


def read_input(case: str, files: list[Path], plan) -> tuple[tuple, list]:
    """``((image, geometry), [])`` of a case to predict, or ``((None, None), problems)`` when it cannot be
    read or has another number of channels than the model's."""
    from ..data.segmentation.nnunet import DatasetError, read_case_images

    try:
        image, geometry = read_case_images(files, case)
    except DatasetError as e:
        return (None, None), e.problems
    if image.shape[0] != plan.num_channels:
        return (None, None), [(case, str(files[0]), f"{image.shape[0]} channel(s); the model was trained on "
                                                    f"{plan.num_channels}")]
    return (image, geometry), []


def predict(cfg: PredictConfig) -> Path:
    """Predict every case; returns the output folder."""
    with use_backend(cfg.scan_backend), cpu_threads(cfg.threads):
        return _predict(cfg)


def _predict(cfg: PredictConfig) -> Path:
    from tqdm import tqdm

    from ..data.io import write_image
    from ..data.segmentation.nnunet import DatasetError

    if cfg.accumulate not in ("float32", "float16"):
        raise ValueError(f"--accumulate must be float32 or float16, got {cfg.accumulate!r}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    run = load_run(cfg.model)
    if run.task != "segmentation":
        raise ValueError(f"{run.path}: a {run.task} run; segmentation prediction needs a segmentation run")
    run.checkpoint(cfg.checkpoint)  # there are weights to predict with
    plan = run.plan
    jobs = plan_outputs(cfg)
    device = resolve_device(cfg.device, prefer=run.description.get("device"))
    check_precision(cfg.precision, device)
    if cfg.mirror_axes and not set(cfg.mirror_axes) <= set(range(plan.spatial_dims)):
        raise ValueError(f"--mirror-axes {' '.join(map(str, cfg.mirror_axes))}: the axes are 0..{plan.spatial_dims - 1}")
    model = run.load_model(cfg.checkpoint, device=device)
    mirror = cfg.mirror if cfg.mirror is not None else bool(run.description.get("recipe", {}).get("mirror_tta"))
    if not cfg.skip_bad:  # every input checked before the first prediction: all bad files in one error
        problems = [p for case, (files, _) in tqdm(jobs.items(), desc="check inputs", unit="case", leave=False,
                                                   disable=not cfg.progress) for p in read_input(case, files, plan)[1]]
        if problems:
            raise DatasetError(cfg.input, problems)
    out = output_folder(cfg.output, "the predictions' folder")
    labels = plan.label_set
    dtype = np.uint8 if max(labels.values) < 256 else np.uint16
    names = list(labels.structures) if labels.has_regions else ["background", *labels.structures]
    failed, started = [], time.perf_counter()
    bar = tqdm(jobs.items(), desc="predict", unit="case", disable=not cfg.progress)
    for case, (files, targets) in bar:
        (image, geometry), problems = read_input(case, files, plan)
        if problems:
            failed += problems
            continue
        t0, large = time.perf_counter(), np.prod(image.shape[1:]) > 2 * np.prod(plan.patch_size)  # many windows
        probs = predict_case(model, plan, image, geometry, mirror=mirror, mirror_axes=cfg.mirror_axes,
                             overlap=cfg.overlap, batch_size=cfg.batch_size, device=device, precision=cfg.precision,
                             accumulate=getattr(torch, cfg.accumulate), progress=cfg.progress and large)
        if large or time.perf_counter() - t0 > 30:  # a case that takes a while says so
            bar.write(f"{case}: {image.shape[1:]} voxels in {time.perf_counter() - t0:.0f} s")
        write_image(labels.to_label_map(probs).astype(dtype), geometry, targets[0])
        if cfg.save_probabilities:
            with atomic_path(targets[1]) as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, probabilities=probs.astype(np.float32), labels=np.array(names))
    write_json(out / "predictions.json", {  # what made these label maps, for evaluate's summary and report
        "run": str(run.path.resolve()), "model": run.model_name, "checkpoint": cfg.checkpoint, "mirror": mirror,
        "input": str(Path(cfg.input).resolve()),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
    done = len(jobs) - len({c for c, _, _ in failed})
    print(f"{done} case(s) predicted with {run.checkpoint(cfg.checkpoint)} on {device}"
          f"{' with mirroring' if mirror else ''} in {time.perf_counter() - started:.0f} s -> {out}")
    if failed:
        raise DatasetError(cfg.input, failed)  # --skip-bad: the good cases are written, the bad ones listed
    return out


def predict_folder(run: str | os.PathLike, input: str | os.PathLike, output: str | os.PathLike, **kwargs) -> Path:
    """Python shortcut: ``predict_folder(RUN, IN, OUT, mirror=True)``."""
    return predict(PredictConfig(input=str(input), output=str(output), model=str(run), **kwargs))
