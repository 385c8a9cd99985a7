"""Training of the local stage (PathoSyn at the scan's own resolution): native 1 mm anatomies, paired
healthy / lesioned / drawn-mask crops, the deviation network's trainer, tuning and evaluation helpers.

    python -m usb_training.local data  --work DIR     # crop shards from the training sources
    python -m usb_training.local train --work DIR     # resumable, wall-time budgeted
"""
