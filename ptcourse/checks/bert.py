"""Checks for the exercises of chapter bert (filled in by that chapter)."""
__all__: list[str] = []
