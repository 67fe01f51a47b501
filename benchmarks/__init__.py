"""napari-nir benchmarks: `python -m benchmarks [--quick] [--device cuda]` prints markdown tables and writes
them, with a description of the machine, to benchmarks/RESULTS.md. Not part of the test run."""
