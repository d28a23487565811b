"""Experiments the package does not use (kept with their results)."""
