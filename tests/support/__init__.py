"""Helpers of the test suite: tiny data sets in torchvision's formats, fault injection, run
modules for the sweep and torchrun tests, the entry-point list."""
