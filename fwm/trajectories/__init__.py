"""Behaviour policies, episode collection, world-model block writers and the stage corpora built from them."""
