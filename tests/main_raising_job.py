"""A job for tests/test_main.py that raises on purpose (bound by tests/main_raising_job.gin).

`run.job = @raising_job`: `raising_job.error = 'bug'` raises a RuntimeError (a bug: main must keep
its traceback), `'user'` a UserError (main prints one line and exits 1).
"""

import gin

from persona_jax.errors import UserError

BUG_MESSAGE = "deliberate bug inside a job"
USER_MESSAGE = "deliberate user mistake inside a job; fix: bind raising_job.error = 'none'"


def _raise_bug():
  raise RuntimeError(BUG_MESSAGE)


@gin.configurable("raising_job")
def raising_job(workdir, method, error: str = "bug"):
  del workdir
  if error == "bug":
    _raise_bug()  # a frame of its own, so the traceback shows where the bug is
  if error == "user":
    raise UserError(USER_MESSAGE)
  return {"method": method.name, "step": 0}
