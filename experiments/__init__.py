"""The experiment CLI (``python -m experiments.main``), its configs and committed results."""
