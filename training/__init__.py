"""Training: the PyTorch Emu model, its stages, checkpoints and the judge."""
