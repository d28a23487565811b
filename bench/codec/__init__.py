"""Codec bench: streaming SNAC fidelity and speed, and the cost of each graphed window shape."""
