"""Checks for the exercises of chapter transfer (filled in by that chapter)."""
__all__: list[str] = []
