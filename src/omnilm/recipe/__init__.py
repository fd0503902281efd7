"""Recipes: ordered training stages run end to end (the main job is the built-in ``demo`` recipe)."""
