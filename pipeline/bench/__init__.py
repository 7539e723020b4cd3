"""Benchmarks behind ``pipeline bench``: each prints JSON figures with a baseline measured in
the same run (these machines are shared and noisy; compare within a run, quote medians)."""
