"""Benchmarks of EMIXER-FL: `python -m bench.NAME --help`; figures in bench/README.md."""
