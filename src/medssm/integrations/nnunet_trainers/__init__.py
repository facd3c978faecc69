"""Holds the module nnU-Net imports through ``nnUNet_extTrainer`` (see medssm.integrations.nnunet)."""
