"""Scoring a model on a subset: mean loss, generated summaries and their ROUGE with bootstrap intervals."""
