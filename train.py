"""Train a smolgpt model: `python train.py --level char --preset micro` (see --help).

A thin wrapper over `smolgpt train`, kept so the original command lines keep working.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works without installing

from smolgpt.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main()
