"""User-facing errors.

Everything a user can cause (a bad flag, a broken checkpoint, a prompt that does
not fit) raises a subclass of `JaxinferError` with a message that names the
problem. Entry points (CLI, Python API, gRPC) catch this one type and report the
message without a traceback; anything else is a bug in jaxinfer.
"""


class JaxinferError(Exception):
    """An error caused by input, configuration or environment, not by a bug."""


class ConfigError(JaxinferError):
    """A model configuration that jaxinfer cannot run (unknown architecture, bad sizes)."""


class CheckpointError(JaxinferError):
    """A checkpoint that is missing, corrupt, or in a refused format."""


class InputError(JaxinferError):
    """A request that cannot be served as given (empty prompt, too long, bad token ids)."""


class ModelFetchError(JaxinferError):
    """The default model could not be obtained."""


def summarize(problems: list[str], first: int = 5, max_chars: int = 160) -> str:
    """`problems` joined for an error message of bounded size: the first few, each cut to
    `max_chars`, then how many more there were. A client that sends 200 bad values gets a
    short message it can read (and that fits in a gRPC status), not all 200."""
    shown = [p if len(p) <= max_chars else p[:max_chars - 3] + "..." for p in problems[:first]]
    rest = len(problems) - len(shown)
    return "; ".join(shown) + (f"; and {rest} more problem{'s' * (rest > 1)}" if rest > 0 else "")
