"""The payments example: see README.md."""
