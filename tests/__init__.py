"""The test suite: one folder per package (and_mask, gen_mask, vizualization), the whole
repository's checks at the top, helpers in `support`."""
