"""Markers of the model card's local-stage section: written by ``usb_training.local.export``, carried over
unchanged by ``usb_training.latent.export`` when a retrained latent model keeps an existing local stage."""
from __future__ import annotations

CARD_START = "<!-- local stage: written by usb_training.local.export -->"
CARD_END = "<!-- end of local stage -->"
