"""Benchmarks behind `mpkv bench`: each compares side by side in one run and reports ratios."""
