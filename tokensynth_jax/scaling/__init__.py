"""Scaling laws: exact parameter and FLOP counts, IsoFLOP sweep plans, fits and plots."""
