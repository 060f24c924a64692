"""`python -m smolgpt` is the `smolgpt` command."""

import sys

from .cli import main

sys.exit(main())
