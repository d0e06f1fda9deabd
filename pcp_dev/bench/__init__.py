"""Helpers of bench/run.py: a counting storage proxy, a function stack, a remote Compute."""
