"""Tests of the vizualization package: toy landscapes and plots of runs."""
