"""Checks for the exercises of chapter autoencoders (filled in by that chapter)."""
__all__: list[str] = []
