"""Sampling from a model (sampler.py) and batched step-wise agent episodes (episodes.py, envs.py)."""
