"""The errors a user can cause. Each message names the problem and the fix; recipes print it without a traceback."""


class FrameworkError(Exception):
    """Base class of every error the framework raises for bad input, before training starts."""


class ConfigError(FrameworkError, ValueError):
    """A config key, value or technique argument is wrong."""


class IncompatibleError(FrameworkError, ValueError):
    """Two techniques, or a technique and the backend, cannot run together."""


class LaunchError(FrameworkError, RuntimeError):
    """The processes, devices or precision the launcher gave are not what the launch config asked for."""


class NonFiniteLossError(FrameworkError, RuntimeError):
    """The loss became NaN/inf during training (the doctor, NaNGuard); the message names the first non-finite layer
    and the fixes."""


def require(condition: bool, message: str) -> None:
    """A technique's argument check: raise `ConfigError(message)` unless `condition` (the message says what the value
    must be and what it got)."""
    if not condition:
        raise ConfigError(message)


def require_int(name: str, value: object, least: int) -> None:
    """`name` must be an integer (not a bool) ≥ `least`, else ConfigError("NAME must be an integer ≥ LEAST,
    got X.")."""
    require(isinstance(value, int) and not isinstance(value, bool) and value >= least,
            f"{name} must be an integer ≥ {least}, got {value!r}.")
