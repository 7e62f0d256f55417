"""Bench: benchmarks (goodput under load, Triton, the online reader, the feedback service) and the real-data converter.
Results go to bench/results/ and are quoted in docs/benchmarks.md."""
