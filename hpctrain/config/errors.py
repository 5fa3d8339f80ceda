"""The one exception type config problems raise; its message says what is wrong and how to fix it."""


class ConfigError(ValueError):
    """A bad config value, key, file or combination. ``str(err)`` is the user-facing message."""
