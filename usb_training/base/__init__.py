"""The shared base of the training package: tiers (``config``), run folders (``paths``), metrics and native-edit
scores, classical baselines, common training plumbing (seeds, threads, checkpoints, history, budgets) and the
model card's local-stage markers. Imports only USBLib; every other layer of ``usb_training`` may import it."""
