"""Benchmarks, run from the repository's root as modules of this package:

    .venv/bin/python -m benchmarks.spawn --quick      # lxdspawner against the local floor
    .venv/bin/python -m benchmarks.placement          # one placement decision, 1,000 members

See benchmarks/README.md for what they measure and the results.
"""
