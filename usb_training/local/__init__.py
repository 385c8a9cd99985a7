"""Training of the local stage (PathoSyn at the scan's own resolution): native 1 mm anatomies, paired
healthy / lesioned / drawn-mask crops, the deviation network's trainer, native validation cases, tuning and
export. Its native-space evaluation is ``usb_training.evaluation.native``; the scores it shares with that are in
``usb_training.base.scores``.

    python -m usb_training.local data  --work DIR     # crop shards from the training sources
    python -m usb_training.local train --work DIR     # resumable, wall-time budgeted
"""
