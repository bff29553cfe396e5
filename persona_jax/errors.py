"""The one exception type for mistakes a user fixes (a flag, a file, a binding, the data)."""


class UserError(ValueError):
  """A mistake the user fixes by changing a flag, a file, a binding or the data.

  `persona_jax.main` and `persona_jax.export` print these as one message with no traceback; every
  other exception keeps its traceback, so a bug in the code never reads like a user's mistake.
  (A ValueError subclass, so callers that catch ValueError for bad values still catch it.)
  """


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named (or must prepare) is not there; the message says the fix."""
