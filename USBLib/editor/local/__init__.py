"""Local stage (PathoSyn at the scan's own resolution): per lesion, a box on the scan's grid; a deterministic
anatomical reconstruction and a deviation-space diffusion model for the stochastic part, guided by ACG/LCG,
fused back with a tight feathered region.

Modules: ``conditioning`` (network inputs, shared with training), ``network`` (the MONAI U-Net),
``sampler`` (deterministic estimate and guided DDIM sampling of the deviation), ``level_gate`` (a heal's
correction kept within the level of the tissue around its fill region), ``prior`` (the template's tissue
prior read box by box through the registration), ``stage`` (``LocalStage``: all of it on one scan); lesion boxes
and resampling to about 1 mm are ``USBLib.imaging.boxes``.
"""
