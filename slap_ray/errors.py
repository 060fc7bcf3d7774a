"""Every error a command reports as one console line, in one hierarchy.

The CLI catches ``SlapError`` (found on the raised exception or among its causes, see
``slap_error_in``), prints its message and exits with its ``exit_code``; anything else is a
real failure and keeps its traceback. A plain module: the core raises these too.
"""

from __future__ import annotations

import re


class SlapError(Exception):
    """A failure with a one-line explanation for the user."""

    exit_code = 2  # a user mistake or a machine that cannot do what was asked
    prefix = ""


class ConfigError(SlapError, ValueError):
    """A config that cannot be used; the message names the offending key (or file:line)."""


class BadRowError(SlapError, ValueError):
    """A row the policy does not allow to pass; the message reads `path:line: reason`."""

    prefix = "bad input row: "

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason

    def __reduce__(self):  # crosses Ray's process boundary with its three parts
        return (BadRowError, (self.path, self.line, self.reason))


class AssetNotFoundError(SlapError, FileNotFoundError):
    """An offline asset package is not installed (``make install`` installs them)."""


class DeviceError(SlapError, RuntimeError):
    """A GPU was asked for (and granted by Ray) but torch cannot use one."""


class JobFailed(SlapError, RuntimeError):
    """Work failed on the cluster (not a user mistake): the message names what failed and
    the log file that holds the detail."""

    exit_code = 1


# Ray keeps no exception object when an actor's constructor raises (ActorDiedError carries the
# worker's traceback as text only), so there the last "slap_ray.errors.<Name>: message" line of
# that text is the error.
_IN_RAY_TEXT = re.compile(r"slap_ray\.errors\.(\w+): (.+)")


def slap_error_in(error: BaseException) -> SlapError | None:
    """The ``SlapError`` that ``error`` is or wraps: through ``__cause__``/``__context__`` and
    Ray's ``RayTaskError.cause``; else one named in a Ray actor's death message."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, SlapError):
            return current
        cause = getattr(current, "cause", None)
        current = (
            cause
            if isinstance(cause, BaseException)
            else (current.__cause__ or current.__context__)
        )
    found = _IN_RAY_TEXT.findall(str(error))
    kinds = {k.__name__: k for k in (ConfigError, AssetNotFoundError, DeviceError, JobFailed)}
    if found and found[-1][0] in kinds:
        return kinds[found[-1][0]](found[-1][1].strip())
    return None
