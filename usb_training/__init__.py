"""Offline training, data generation, evaluation and bundle export for USB (see issue tracker for scope)."""
