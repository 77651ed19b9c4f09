"""Experiment recipes: one module per command, each a config plus a ``run_*`` function writing a run folder."""
