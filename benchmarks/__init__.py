"""Benchmarks of nearfix: beside the package, not in the installed wheel; they import it like a user."""
