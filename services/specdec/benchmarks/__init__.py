"""Measurements, none of them part of `make test`: each runs the real parts side by side in
one run and prints ratios (`specdec bench`, `python -m specdec.benchmarks.<name>`, the
`make` targets README lists). Nothing here is imported by the services."""
