"""``medssm train`` for classification: the task plug-in of the one trainer (:mod:`.trainer`) for a MedMNIST
file, image folders or a CSV: the train and val splits, random-resized crops and flips, the model card's input
normalisation, cross-entropy (binary per finding for multi-label data), validation by (mean) AUC. What the
options do: docs/how-to/classification.md.

Example:
    >>> train_classifier(ClassifierTrainConfig(data="pneumoniamnist", model="medmamba_t", out="runs/pneumonia"))
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from ..budget import Candidate, Timing
from ..data.classification import ClassificationDataset, open_training_data
from ..devices import autocast
from ..inference.classification import predict_proba
from ..metrics.classification import classification_metrics
from ..nets.registry import build_for_data, get_model_card
from . import distributed
from .loop import time_step
from .options import DEFAULT_MODELS, ClassifierTrainConfig
from .trainer import Task, fit

__all__ = ["ClassifierTrainConfig", "train_classifier"]

class ClassificationTask(Task):
    """Image classification, scored by validation AUC."""

    name, score, default_val_every = "classification", "val_auc", 1

    def default_model(self) -> str:
        return DEFAULT_MODELS[self.name, 2]  # MedMamba-T, whatever the dimensionality

    def open(self, run: Path) -> None:
        cfg = self.cfg
        self.train_src, self.val_src = open_training_data(cfg.data, cfg.limit, cfg.seed, root=cfg.data_root, size=cfg.size,
                                                          download=cfg.download, val_fraction=cfg.val_fraction,
                                                          label_columns=cfg.label_columns)
        self.multi_label, self.classes = self.train_src.multi_label, self.train_src.classes
        self.loss_fn = cfg.make_loss(self.train_src.labels, len(self.classes))
        self.spatial_dims = self.train_src.spatial_dims
        self.card = get_model_card(cfg.model or self.default_model())
        if cfg.drop_path is not None:
            self.model_kwargs = {"drop_path_rate": cfg.drop_path, **self.model_kwargs}
        native = self.train_src.native_size or self.card.input_size
        self.input_size = int(cfg.input_size or native[0])
        self.held_out = len(self.val_src)

    def prepare(self, run: Path, resuming: bool, progress: bool) -> None:
        self.batch_size = self.recipe.batch_size or 32

    def dataset(self, source, train: bool) -> ClassificationDataset:
        c = self.cfg
        return ClassificationDataset(source, self.input_size, train, None, c.crop_scale, hflip=c.hflip, vflip=c.vflip,
                                     normalize=self.card.normalize)

    def budget_request(self, device: torch.device, precision: str) -> dict:
        """A real training step (data loading and augmentation included) and the validation of a sample."""
        def measure(candidate: Candidate) -> Timing:
            model = self.model().to(device)
            draws = torch.utils.data.RandomSampler(self.dataset(self.train_src, True), replacement=True,
                                                   num_samples=3 * candidate.batch_size)
            loader = iter(torch.utils.data.DataLoader(draws.data_source, batch_size=candidate.batch_size, sampler=draws))
            step, memory = time_step(model, lambda: next(loader)[:2], self.loss_fn.to(device), device, precision)
            few = torch.utils.data.Subset(self.dataset(self.val_src, False), range(min(64, len(self.val_src))))
            t = time.perf_counter()
            with autocast(device, precision):
                predict_proba(model, few, batch_size=64, device=device, multi_label=self.multi_label)
            return Timing(step, (time.perf_counter() - t) / len(few), memory=memory)

        return dict(candidates=[Candidate(1.0, self.batch_size)], measure=measure, held_out=len(self.val_src),
                    samples_per_epoch=len(self.train_src))

    def follow_budget(self, budget) -> None:
        self.batch_size = budget.candidate.batch_size
        self.val_src = self.val_src.limited(budget.val_cases or None, self.cfg.seed)
        self.held_out = len(self.val_src)

    def build_model(self, candidate: Candidate | None = None) -> torch.nn.Module:
        return build_for_data(self.card.name, spatial_dims=self.train_src.spatial_dims,
                              in_channels=self.train_src.in_chans, num_classes=len(self.classes), **self.model_kwargs)

    def description(self) -> dict:
        mean, std = self.card.normalize
        return {"task": "classification", "classes": self.classes, "multi_label": self.multi_label,
                "in_chans": self.train_src.in_chans,
                "spatial_dims": self.train_src.spatial_dims, "input_size": self.input_size,
                "normalize": {"mean": mean, "std": std}, "data": str(self.cfg.data),
                "train_samples": len(self.train_src), "val_samples": len(self.val_src),
                "recipe": dataclasses.asdict(self.recipe)}

    def write_files(self, run: Path) -> None:
        from ..files import write_json

        write_json(run / "splits.json", {"train": [self.train_src.name(i) for i in range(len(self.train_src))],
                                         "val": [self.val_src.name(i) for i in range(len(self.val_src))]})

    def start(self, run: Path, device: torch.device, progress: bool) -> None:
        train = self.dataset(self.train_src, True)
        self.sampler = distributed.data_sampler(train, self.cfg.seed)  # the batch size is the global batch
        self.loader = torch.utils.data.DataLoader(train, batch_size=distributed.local_batch(self.batch_size),
                                                  shuffle=self.sampler is None, sampler=self.sampler,
                                                  num_workers=self.cfg.num_workers)
        self.val_ds = self.dataset(self.val_src, False)
        self.loss_fn.to(device)

    def summary(self) -> str:
        kind = "findings" if self.multi_label else "classes"
        return (f"{len(self.classes)} {kind} {self.classes}, {len(self.train_src)} train / {len(self.val_src)} val "
                f"samples at {self.input_size}px, batch {self.batch_size}")

    def pass_length(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int):
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return ((x, y) for x, y, _ in self.loader)

    def validate(self, model, device, precision, progress) -> dict:
        share = distributed.split_work(range(len(self.val_ds)))
        with autocast(device, precision):
            probs = predict_proba(model, torch.utils.data.Subset(self.val_ds, share), batch_size=max(self.batch_size, 64),
                                  device=device, progress=progress, desc="validate", multi_label=self.multi_label
                                  ) if share else np.zeros((0, 0))
        m = classification_metrics(self.val_src.labels, np.asarray(distributed.gather_work(list(probs))), self.classes)
        return {"val_loss": m["log_loss"], "val_acc": m["acc"], self.score: m["auc"], "val_f1": m["f1"]}


def train_classifier(cfg: ClassifierTrainConfig) -> Path:
    """Train as ``cfg`` says; returns the run folder. See the module docstring for what it writes."""
    return fit(ClassificationTask(cfg))
