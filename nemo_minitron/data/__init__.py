"""Datasets: calibration text for pruning (calibration.py)."""
