"""Offline engine and attention benchmarks (`kvrelay bench engine`); not runtime code."""
