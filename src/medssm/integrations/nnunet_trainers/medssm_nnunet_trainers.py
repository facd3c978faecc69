"""Entry point for nnU-Net v2's trainer discovery.

Point ``nnUNet_extTrainer`` at this folder (``medssm.integrations.nnunet.TRAINER_DIR``): nnU-Net
imports the modules found here as top-level modules and looks for the ``-tr`` class name. This one
re-exports medssm's trainers, so the classes are the same objects as in
``medssm.integrations.nnunet``.
"""

from medssm.integrations.nnunet import *  # noqa: F401,F403
from medssm.integrations.nnunet import __all__  # noqa: F401
