"""`bench/pipeline.py` with random SIGKILLs of workers, scheduler and API and one Redis
flush while orders flow; prints the same JSON line (lost and duplicates must be 0).

    .venv/bin/python -m bench.chaos [--orders 2000]
"""

from __future__ import annotations

import sys

from bench.pipeline import main

if __name__ == "__main__":
    sys.exit(main(chaos=True))
