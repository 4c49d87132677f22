"""Benchmarks against the obvious alternatives, measured side by side: `capfilt bench NAME [--quick]`."""
