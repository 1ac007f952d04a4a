"""Benchmarks of this trainer against transformers v5 native on the same job (`python -m bench.compare`)."""
