"""Offline training for USB: synthetic data from registry templates, autoencoder and paired U-Net training,
tuning of defaults, evaluation against baselines, and export of USBLib model bundles.

Layers (import-linter contracts in ``.importlinter``), each importing only those below it and USBLib:
``evaluation/`` (nothing imports it) > ``latent/`` | ``local/`` (independent of each other) > ``data/`` > ``base/``.

``python -m usb_training run --tier tiny --work RUN --out BUNDLE`` runs every stage (see README)."""
