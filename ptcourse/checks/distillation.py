"""Checks for the exercises of chapter distillation (filled in by that chapter)."""
__all__: list[str] = []
