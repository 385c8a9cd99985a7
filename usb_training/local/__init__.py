"""Training of the local stage (PathoSyn at the scan's own resolution): native 1 mm anatomies and their lesion
sites (``anatomies``, ``sites``), deformed scenes with a registered template prior (``scenes``, ``priors``),
training windows shaped like inference boxes (``crops``, ``masks``, ``windows``, ``shards``), the deviation
network's batches and trainer (``batches``, ``train``), native validation cases, tuning and export. Its
native-space evaluation is ``usb_training.evaluation.native``; the scores it shares with that are in
``usb_training.base.scores``.

    python -m usb_training.local data   --work DIR [--count N --seed S --workers W]   # window shards
    python -m usb_training.local train  --work DIR [--minutes M] [--steps N]          # resumable, budgeted
    python -m usb_training.local export --work DIR --source BUNDLE --out BUNDLE       # the bundle
"""
