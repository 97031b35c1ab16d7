"""Benchmarks: random-weight models at named sizes, the run matrix, reports."""
