"""Post-training quantization: the shared integer grid (grid.py) and one file per method."""
