"""The errors a user can cause. Each message names the problem and the fix; recipes print it without a traceback."""


class FrameworkError(Exception):
    """Base class of every error the framework raises for bad input, before training starts."""


class ConfigError(FrameworkError, ValueError):
    """A config key, value or technique argument is wrong."""


class IncompatibleError(FrameworkError, ValueError):
    """Two techniques, or a technique and the backend, cannot run together."""


class LaunchError(FrameworkError, RuntimeError):
    """The processes, devices or precision the launcher gave are not what the launch config asked for."""
