"""Example applications built on pgidem (not part of the package)."""
