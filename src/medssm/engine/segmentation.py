"""``medssm train`` for segmentation: the task plug-in of the one trainer (:mod:`.trainer`) for an nnU-Net raw
dataset: its check, plan (``plan.json``), folds (``splits.json``), preprocessing cache, foreground-oversampled
patches, augmentation and sliding-window validation. What the steps do: docs/how-to/train-segmentation.md.

Example:
    medssm train --data ../shared/data/Dataset001_LungXray --model lightm_unet_2d -o runs/lung --epochs 100
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..budget import Candidate, Timing
from ..data.segmentation.nnunet import NnUNetDataset, resolve_data, verify_dataset
from ..data.segmentation.plan import Plan, budget_plans, make_plan, plan_dataset
from ..data.segmentation.splits import read_or_make_splits, save_splits
from ..devices import autocast
from ..inference.sliding import sliding_window_probabilities, window_batch
from ..metrics.segmentation import dice_of_masks
from ..nets.registry import build_for_data, get_model_card
from . import distributed
from .loop import call_seconds, time_step
from .losses import make_loss
from .options import DEFAULT_MODELS, TrainConfig
from .trainer import Task, fit

class SegmentationTask(Task):
    """Segmentation of an nnU-Net raw dataset, scored by validation Dice."""

    name, score, default_val_every = "segmentation", "val_dice", 5

    def default_model(self) -> str:
        return DEFAULT_MODELS[self.name, NnUNetDataset(resolve_data(self.cfg.data)).spatial_dims]

    def run_folder(self) -> Path:
        return super().run_folder() if self.cfg.out else Path(f"{super().run_folder()}_fold{self.cfg.fold}")

    def open(self, run: Path) -> None:
        cfg = self.cfg
        root = resolve_data(cfg.data)
        self.dataset = verify_dataset(root)  # DatasetError listing every bad case; nothing written yet
        self.spatial_dims = self.dataset.spatial_dims
        self.card = get_model_card(cfg.model or self.default_model())
        # Too few cases for 5 folds, or a splits.json naming other cases: refused before anything is written.
        self.splits = read_or_make_splits(run / "splits.json", self.dataset.cases)
        held_out = self.splits[cfg.fold]["val"]
        self.held_out = min(cfg.val_cases, len(held_out)) if cfg.val_cases else len(held_out)

    def prepare(self, run: Path, resuming: bool, progress: bool) -> None:
        self.plans = {}
        if resuming and (run / "plan.json").is_file():
            self.plan = Plan.load(run / "plan.json")
            return
        fingerprint = plan_dataset(self.dataset, progress=progress)
        if self.cfg.budget is None:
            self.plan = make_plan(self.dataset, divisor=self.card.size_divisor, fingerprint=fingerprint,
                                  **self.cfg.plan_overrides())
            return
        plans = budget_plans(self.dataset, fingerprint, self.card.size_divisor, **self.cfg.plan_overrides())
        self.plan = plans[0]
        self.plans = {(p.target_spacing[0] / self.plan.target_spacing[0], tuple(p.patch_size)): p for p in plans}

    def budget_request(self, device: torch.device, precision: str) -> dict:
        """Each resolution's plan timed: a step on random data, a median case's sliding window, and the
        preprocessing of every case (measured on one)."""
        from ..data.segmentation.preprocess import preprocess_case

        case = self.dataset.load_case(self.dataset.cases[0])
        preprocess_s = len(self.dataset.cases) * call_seconds(
            lambda: preprocess_case(case.image, case.geometry, self.plan, case.label))
        loss_fn = make_loss(self.recipe.loss, self.plan.label_set).to(device)

        def measure(candidate: Candidate) -> Timing:
            plan = self.plans[candidate.scale, candidate.patch_size]
            model = self.model(candidate).to(device)
            batch = (torch.randn(candidate.batch_size, plan.num_channels, *plan.patch_size),
                     torch.randint(0, max(plan.label_set.values) + 1, (candidate.batch_size, 1, *plan.patch_size)))
            step, memory = time_step(model, lambda: batch, loss_fn, device, precision)
            image = torch.randn(plan.num_channels, *plan.median_shape)
            with autocast(device, precision):
                case_s = call_seconds(lambda: sliding_window_probabilities(
                    model, image, plan.patch_size, batch_size=window_batch(plan.patch_size, candidate.batch_size),
                    device=device, activation=plan.label_set.activation), device)
            return Timing(step, case_s, preprocess_s, memory)

        candidates = [Candidate(scale, p.batch_size, patch) for (scale, patch), p in self.plans.items()]
        return dict(candidates=candidates, measure=measure, held_out=self.held_out)

    def follow_budget(self, budget) -> None:
        c = budget.candidate  # a resumed run's plan is the fitted one
        self.plan = dataclasses.replace(self.plans.get((c.scale, c.patch_size), self.plan), batch_size=c.batch_size)
        self.held_out = budget.val_cases or self.held_out

    def build_model(self, candidate: Candidate | None = None) -> torch.nn.Module:
        plan = self.plans[candidate.scale, candidate.patch_size] if candidate else self.plan
        if candidate is None:
            distributed.local_batch(plan.batch_size)  # refuse a global batch that does not split over the ranks
        return build_for_data(self.card.name, spatial_dims=plan.spatial_dims, in_channels=plan.num_channels,
                              num_classes=plan.label_set.channels, patch_size=plan.patch_size, **self.model_kwargs)

    def description(self) -> dict:
        return {"task": "segmentation", "dataset": self.dataset.name, "labels": self.plan.labels, "plan": self.plan.to_dict(),
                "fold": self.cfg.fold, "recipe": dataclasses.asdict(self.recipe), "file_ending": self.dataset.file_ending,
                "channel_names": self.dataset.channel_names}

    def write_files(self, run: Path) -> None:
        self.plan.save(run / "plan.json")
        if not (run / "splits.json").is_file():
            save_splits(run / "splits.json", self.splits)

    def start(self, run: Path, device: torch.device, progress: bool) -> None:
        from ..data.segmentation.preprocess import build_cache, load_cache
        from ..data.segmentation.sampling import PatchSampler
        from ..data.segmentation.transforms import training_transforms

        cfg, plan = self.cfg, self.plan
        train_cases = list(self.splits[cfg.fold]["train"])
        val_cases = list(self.splits[cfg.fold]["val"])[:self.held_out]
        with distributed.main_first():  # rank 0 preprocesses, the other ranks find the cache built
            cache = load_cache(build_cache(self.dataset, plan, Path(cfg.cache) if cfg.cache else run / "preprocessed",
                                           progress=progress, cases=sorted({*train_cases, *val_cases})))
        self.sampler = PatchSampler(cache, train_cases, plan.patch_size, plan.batch_size,
                                    oversample_foreground=plan.oversample_foreground, seed=cfg.seed)
        self.augment = (training_transforms(plan.spatial_dims, plan.patch_size, self.recipe.augmentation,
                                            seed=cfg.seed) if self.recipe.augmentation != "none" else None)
        self.loss_fn = make_loss(self.recipe.loss, plan.label_set).to(device)  # its region table too
        self.val_data = [(cache[c]["image"], cache[c]["label"]) for c in val_cases]

    def summary(self) -> str:
        plan = self.plan
        return (f"{len(self.splits[self.cfg.fold]['train'])} train / {len(self.val_data)} val cases of {self.dataset.name}, "
                f"patch {plan.patch_size} at spacing {[round(s, 3) for s in plan.target_spacing]}, batch {plan.batch_size}")

    def batches(self, epoch: int):
        rank = distributed.world().rank
        while True:  # every rank draws the global batch, then augments and learns from its slice
            batch = {k: distributed.shard(v) for k, v in next(self.sampler).items() if k in ("image", "label")}
            if self.augment is not None:
                batch = self.augment(batch, first=rank * len(batch["image"]))
            yield batch["image"], batch["label"]

    @torch.no_grad()
    def validate(self, model, device, precision, progress) -> dict:
        """Hard Dice of each class or region on the held-out cases, each process scoring its share."""
        from tqdm import tqdm

        labels, scores = self.plan.label_set, []
        for image, label in tqdm(distributed.split_work(self.val_data), desc="validate", unit="case", leave=False,
                                 disable=not progress):
            with autocast(device, precision):
                probs = sliding_window_probabilities(
                    model, torch.as_tensor(image), self.plan.patch_size, device=device, activation=labels.activation,
                    batch_size=window_batch(self.plan.patch_size, self.plan.batch_size))
            scores.append(dice_of_masks(labels.masks(labels.to_label_map(probs.numpy())), labels.masks(label)))
        per_structure = np.mean(distributed.gather_work(scores), axis=0)
        return {self.score: float(np.mean(per_structure)),
                **{f"val_dice_{n}": float(d) for n, d in zip(labels.structures, per_structure)}}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "augment": self.augment.state_dict() if self.augment else {}}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.augment is not None and state.get("augment"):
            self.augment.load_state_dict(state["augment"])


def train(cfg: TrainConfig) -> Path:
    """Train as configured; returns the run folder."""
    return fit(SegmentationTask(cfg))
