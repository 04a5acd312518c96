"""Data set builders shared by and_mask and gen_mask."""
