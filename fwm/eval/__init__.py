"""Evaluation of a checkpoint: metrics of episodes (metrics.py), the run (run.py), the markdown report (report.py)."""
