"""`python -m smolgpt` is the `smolgpt` command."""

from .cli import console_main

console_main()
