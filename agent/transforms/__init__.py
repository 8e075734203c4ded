"""Gradient transforms: normalization, unit-wise and global clipping, applied in the canonical order."""
