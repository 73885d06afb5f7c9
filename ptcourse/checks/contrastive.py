"""Checks for the exercises of chapter contrastive (filled in by that chapter)."""
__all__: list[str] = []
