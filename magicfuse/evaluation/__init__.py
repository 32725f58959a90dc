"""Evaluation: fusion metrics, semantic protocols, baselines, ablations and reports."""
