"""memkit's built-in parts, registered from :data:`memkit.plugins.DEFAULT_PLUGINS`."""
