"""lrkernels microbenchmarks: `python -m benchmarks --help`."""
