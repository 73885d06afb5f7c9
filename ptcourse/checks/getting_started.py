"""Checks for the exercises of chapter getting_started (filled in by that chapter)."""
__all__: list[str] = []
