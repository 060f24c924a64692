"""The version of smolgpt, which files it writes record (checkpoints, exports, config.json)."""

__version__ = "0.12.0"
