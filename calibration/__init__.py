"""Calibration and quantization of bundles, with accuracy reports."""
