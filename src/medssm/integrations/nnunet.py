"""nnU-Net v2 trainers for medssm's networks: stock ``nnunetv2``, no fork.

nnU-Net plans, preprocesses, augments, trains, validates and predicts as it always does; these
trainer classes only swap the network (through the current ``build_network_architecture``
signature, which inference calls too) and take the optimiser and test-time mirroring from the
model's recipe (its card: :func:`medssm.get_model_card`).

Use (see docs/how-to/nnunet.md)::

    .venv/bin/pip install -c constraints.txt -e ".[nnunet]"
    export nnUNet_extTrainer=$(python -c "import medssm.integrations.nnunet as m; print(m.TRAINER_DIR)")
    nnUNetv2_train Dataset001_LungXray 2d 0 -tr nnUNetTrainerLightMUNet
    nnUNetv2_predict -i imagesTs -o pred -d 1 -c 2d -f 0 -tr nnUNetTrainerLightMUNet

``TRAINER_DIR`` holds one module that re-exports the classes below; nnU-Net's ``nnUNet_extTrainer``
search imports it and finds the class named by ``-tr``. To make your own variant, subclass one of
these in a file of your own folder and add that folder to ``nnUNet_extTrainer`` (``os.pathsep``-
separated).

Classes: :class:`nnUNetTrainerLightMUNet` (2D or 3D from the plan's patch size),
:class:`nnUNetTrainerSegMamba`. MedMamba is a classifier and has no nnU-Net trainer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..engine.schedules import make_optimizer
from ..extras import require
from ..nets.registry import create_model, get_model_card

PolyLRScheduler = require("nnunetv2.training.lr_scheduler.polylr", "nnunet", "The nnU-Net plug-in").PolyLRScheduler
nnUNetTrainer = require("nnunetv2.training.nnUNetTrainer.nnUNetTrainer", "nnunet", "The nnU-Net plug-in").nnUNetTrainer

__all__ = ["TRAINER_DIR", "MedssmTrainer", "nnUNetTrainerLightMUNet", "nnUNetTrainerSegMamba"]

TRAINER_DIR = str(Path(__file__).with_name("nnunet_trainers"))


class MedssmTrainer(nnUNetTrainer):
    """nnU-Net's trainer with a medssm network (no deep supervision, no ``torch.compile``), its
    recipe's optimiser, learning rate and weight decay (with nnU-Net's poly schedule), and test-time
    mirroring only if the recipe has it.

    Subclasses set ``models`` (spatial dims -> registered model name) and ``model_kwargs``; the
    network gets ``in_channels``/``out_channels`` from nnU-Net.
    """

    models: dict[int, str] = {}
    model_kwargs: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # the networks return one full-resolution output
        self.recipe = get_model_card(self.model_name(self.configuration_manager.patch_size)).recipe
        self.initial_lr, self.weight_decay = self.recipe.lr, self.recipe.weight_decay

    @classmethod
    def model_name(cls, patch_size) -> str:
        """The registered model for a patch of this many dimensions."""
        name = cls.models.get(len(patch_size))
        if name is None:
            raise ValueError(f"{cls.__name__} has no {len(patch_size)}D network (patch size {tuple(patch_size)}); "
                             f"it supports {', '.join(f'{d}D' for d in sorted(cls.models))}")
        return name

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """The medssm network for this configuration's patch size (also called by nnU-Net's predictor)."""
        patch = tuple(int(s) for s in configuration_manager.patch_size)
        name = cls.model_name(patch)
        model = create_model(name, **{"in_channels": num_input_channels, "out_channels": num_output_channels,
                                      **cls.model_kwargs})
        try:
            model.check_input_size((1, num_input_channels, *patch))
        except ValueError as e:
            raise ValueError(f"{cls.__name__}: the plan's patch size {patch} does not fit {name}: {e}. Edit "
                             "patch_size in the plans file (nnUNet_preprocessed/DATASET/nnUNetPlans.json)") from None
        return model

    def configure_optimizers(self):
        optimizer = make_optimizer(self.network.parameters(), self.recipe)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's augmentation; mirroring at prediction only if the recipe has it (the choice is
        saved in the checkpoint, so ``nnUNetv2_predict`` follows it)."""
        settings = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.recipe.mirror_tta:
            self.inference_allowed_mirroring_axes = None
        return settings

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """No-op: medssm's networks have no deep-supervision heads (nnU-Net's default one would fail)."""

    def _do_i_compile(self) -> bool:
        """Never compile: the CPU scan is a compiled numba kernel that ``torch.compile`` cannot trace."""
        return False


class nnUNetTrainerLightMUNet(MedssmTrainer):
    """LightM-UNet with the authors' recipe (Adam, lr 1e-4, weight decay 1e-5, no test-time
    mirroring), poly LR, 100 epochs of 250 iterations, nnU-Net's Dice + cross-entropy and augmentation."""

    models = {2: "lightm_unet_2d", 3: "lightm_unet_3d"}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100


class nnUNetTrainerSegMamba(MedssmTrainer):
    """SegMamba (2D or 3D) with the authors' optimiser, which is nnU-Net's default (SGD, lr 1e-2,
    momentum 0.99, Nesterov, weight decay 3e-5, poly LR), and test-time mirroring. Patch sizes must
    divide by 16."""

    models = {2: "segmamba_2d", 3: "segmamba_3d"}
