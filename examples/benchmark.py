"""Benchmark entry point; see `pcg_backend/bench.py` (also `python -m pcg_backend.bench`)."""

from pcg_backend.bench import main

if __name__ == "__main__":
    main()
