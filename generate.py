"""Generate text from a checkpoint: `python generate.py CHECKPOINT --prompt "..."` (see --help).

A thin wrapper over `smolgpt generate`, kept so the original command lines keep working.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works without installing

from smolgpt.cli import generate_main  # noqa: E402

if __name__ == "__main__":
    generate_main()
