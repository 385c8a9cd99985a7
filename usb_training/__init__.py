"""Offline training for USB: synthetic data from registry templates, autoencoder and paired U-Net training,
tuning of defaults, evaluation against baselines, and export of USBLib model bundles.

``python -m usb_training run --tier tiny --work RUN --out BUNDLE`` runs every stage (see README)."""
