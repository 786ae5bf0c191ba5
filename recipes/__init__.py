"""memkit's built-in recipe files (TOML), installed as the ``memkit.recipes`` package."""
