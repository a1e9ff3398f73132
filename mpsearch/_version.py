"""The version plans record in their provenance (the one in pyproject.toml)."""

__version__ = "0.1.0"
