"""Plug-ins for tools people already use: nnU-Net v2 trainers (:mod:`medssm.integrations.nnunet`,
needs ``medssm[nnunet]``). MONAI needs no plug-in: the networks are plain ``nn.Module``\\ s that
``sliding_window_inference`` and bundle configs (``_target_: medssm.nets.segmamba.SegMamba``) take
as they are. Nothing here is imported by ``import medssm``."""
