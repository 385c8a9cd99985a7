"""Evaluation of trained bundles, on top of every other layer (nothing imports it): model-grid heal/embed and
generation against the held-out source (``evaluate``, ``generation``), the native-space heal yardstick and embed
of both stages (``native``, with the downstream segmentation check of ``segment``) and the guidance figure
(``figures``).

    python -m usb_training.evaluation.evaluate --model USBLib/models/usb-tiny [--native]
    python -m usb_training.evaluation.generation --model USBLib/models/usb-tiny
"""
