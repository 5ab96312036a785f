"""Evaluate: metrics, confusion plots, the evaluation run, the TF-IDF baseline."""
