"""Checks that need a CUDA machine; run by hand, never collected by pytest."""
