"""Synthetic training data from registry-installed templates."""
