"""Evaluation of a checkpoint: metrics of episodes (metrics.py), the world-model block and q against what
happened (foresight.py), the run (run.py), the markdown report (report.py)."""
