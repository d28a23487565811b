"""The reliability scenarios: one implementation each, run at length by `run.py` and short by tests/."""
