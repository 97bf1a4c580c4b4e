"""Fuzz harnesses (see fuzz/README.md)."""
