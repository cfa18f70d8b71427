"""Tests: float64 NumPy references, gradient checks, property tests, doctests."""
