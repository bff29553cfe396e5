"""The one entry point: parse gin, write the config into the workdir, run the configured job.

  python -m persona_jax.main --gin_file=gin/coprocessor.gin --workdir=/tmp/run \
      --gin_bindings='TrainConfig.num_steps=10'

A gin file names a method and a job (`persona_jax.train.jobs`):

  run.method = 'coprocessor'    # a room registered with `persona_jax.train.method.register_method`
  run.job = @train              # or @evaluate (restore the trained model, re-write its tables)

Rooms are found by `persona_jax.train.method.discover_methods()` (every `persona_jax/<room>/job.py`),
never by a list kept here. Gin files are looked up as given, then inside the installed package
(`persona_jax/gin/`), so `--gin_file=gin/coprocessor.gin` works from the repository and from an
installed wheel alike.

User errors (`persona_jax.errors.UserError`: a missing gin file, an unknown binding, an unwritable
workdir, data that is not prepared, a bad config value) print one message naming the fix and exit
with status 1; `--traceback` shows the full traceback. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import sys

# TensorFlow reads this once, when it is first imported (below, through the data pipelines): quiet
# unless --verbose. (TF's first two lines, before absl::InitializeLog, cannot be silenced this way.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if "--verbose" in sys.argv else "3")

import gin
from absl import app, flags, logging
from etils import epath

from persona_jax.train import trainer as trainer_lib
from persona_jax.errors import UserError
from persona_jax.train import workdir as workdir_lib

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config file(s), applied in order (repeatable).")
flags.DEFINE_bool("verbose", False, "Show INFO logs (absl, JAX, TensorFlow, Orbax); by default the "
                  "console shows the progress line, results, warnings and errors only.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'TrainConfig.num_steps=10' (repeatable).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and config.gin "
                    "(default: runs/<name of the last --gin_file> under the current directory).")
flags.DEFINE_bool("traceback", False, "Show full tracebacks for user errors too.")

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
GIN_DIR = PACKAGE_DIR / "gin"  # the packaged configs (the repository's gin/ links here)


def import_job_modules() -> list[str]:
  """Registers the generic jobs and every method room; returns the method names."""
  from persona_jax.train import jobs  # pylint: disable=g-import-not-at-top

  return jobs.discover_methods()


def resolve_gin_file(path: str) -> str:
  """A gin file as given, else inside the package (`gin/x.gin` -> persona_jax/gin/x.gin)."""
  candidates = [pathlib.Path(path), PACKAGE_DIR / path, GIN_DIR / pathlib.Path(path).name]
  for candidate in candidates:
    if candidate.is_file():
      return str(candidate.resolve())
  raise UserError(f"--gin_file={path}: file not found (looked in {os.getcwd()} and {GIN_DIR}). "
                  "Fix the path, e.g. --gin_file=gin/pretrain.gin.")


def parse_gin(gin_files: list[str], gin_bindings: list[str]) -> None:
  files = [resolve_gin_file(f) for f in gin_files]
  gin.add_config_file_search_path(str(GIN_DIR))
  gin.add_config_file_search_path(str(PACKAGE_DIR))
  try:
    gin.parse_config_files_and_bindings(files, gin_bindings, finalize_config=False)
  except (ValueError, KeyError, SyntaxError, OSError, ImportError) as error:
    message = str(error).strip()
    raise UserError(f"Gin config could not be applied: {message}\nFix the binding or gin file named "
                    "above (check the configurable's name and its argument; a method's configurables "
                    "exist only once its module is imported).") from error
  if not _has_binding("run.job"):
    raise UserError("No job selected: bind one, e.g. --gin_bindings='run.job = @train' or "
                    "--gin_file=gin/pretrain.gin.")
  if not _has_binding("run.method"):
    raise UserError("No method selected: bind one, e.g. --gin_bindings=\"run.method = 'pretrain'\" "
                    "or --gin_file=gin/pretrain.gin.")


def _has_binding(name: str) -> bool:
  try:
    gin.query_parameter(name)
    return True
  except ValueError:
    return False


def default_workdir(gin_files: list[str]) -> str:
  """`runs/<stem of the last gin file>`: rerunning the same command resumes the same run."""
  if not gin_files:
    raise UserError("--gin_file is required (e.g. --gin_file=gin/coprocessor.gin); it selects the job.")
  return os.path.join("runs", pathlib.Path(gin_files[-1]).stem)


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir (a local path or a bucket URL such as gs://b/run) and checks it is writable."""
  workdir = workdir_lib.resolve(workdir)
  probe = epath.Path(workdir_lib.join(workdir, ".write_test"))
  try:
    workdir_lib.write_text(probe, "ok")
    probe.unlink()
  except OSError as error:
    raise UserError(f"--workdir={workdir} cannot be written ({error.strerror or error}). Fix: choose a "
                    "directory you can create and write to.") from error
  return workdir


def write_config(workdir: str, text: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    workdir_lib.write_text(workdir_lib.join(workdir, "config.gin"), text)


# Exceptions that come from bad flags, files, bindings or data rather than from bugs.
USER_ERROR_TYPES = (UserError,)


def run_main(gin_files: list[str], gin_bindings: list[str], workdir: str | None):
  """Everything `main` does, callable from Python (tests, notebooks)."""
  from persona_jax.train.partitioning import maybe_initialize_distributed  # pylint: disable=g-import-not-at-top

  workdir = prepare_workdir(workdir or default_workdir(gin_files))
  print(f"workdir: {workdir}", flush=True)
  maybe_initialize_distributed()
  import_job_modules()
  parse_gin(gin_files, gin_bindings)
  write_config(workdir, gin.config_str())  # what was asked for; replaced by the operative one below
  from persona_jax.train import jobs  # pylint: disable=g-import-not-at-top

  with gin.unlock_config():
    result = jobs.run(workdir)
  write_config(workdir, gin.operative_config_str())
  return result


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax (dozens of lines per checkpoint); warnings and errors still pass."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "/orbax/" not in record.pathname


def configure_logging(verbose: bool) -> None:
  """A quiet console by default: absl / Python logging at WARNING (JAX, Orbax, TFDS and our own INFO
  lines hidden; the progress line and results are printed, not logged), TensorFlow's C++ INFO and
  WARNING lines off. `--verbose` restores INFO everywhere."""
  if verbose:
    logging.set_verbosity(logging.INFO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    return
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.set_verbosity(logging.WARNING)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF/XLA C++ logging read after this point
  for name in ("jax", "orbax", "absl", "tensorflow", "tensorflow_datasets", "seqio", "datasets"):
    std_logging.getLogger(name).setLevel(std_logging.WARNING)


def main(argv):
  configure_logging(FLAGS.verbose)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}: use --gin_file / --gin_bindings / --workdir.")
  try:
    result = run_main(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.workdir)
  except trainer_lib.Preempted as error:  # a job that called raise_if_preempted()
    print(f"preempted: {error}", file=sys.stderr, flush=True)
    sys.exit(trainer_lib.PREEMPTED_EXIT_CODE)
  except USER_ERROR_TYPES as error:
    if FLAGS.traceback:
      raise
    print(f"error: {type(error).__name__}: {error}\n(run with --traceback for the full traceback)",
          file=sys.stderr, flush=True)
    sys.exit(1)
  exit_if_preempted(result)


# Preemption (issue 19): a SIGTERM-ed run saved a checkpoint; exit 75 so the launcher reruns it.
def exit_if_preempted(result=None) -> None:
  """Exits with `PREEMPTED_EXIT_CODE` when a Trainer of this process stopped on SIGTERM (or the job's
  result, a TrainResult or a dict, says `preempted`)."""
  flagged = result.get("preempted") if isinstance(result, dict) else getattr(result, "preempted", False)
  if trainer_lib.was_preempted() or flagged is True:
    print(f"preempted: checkpoint saved; exiting with status {trainer_lib.PREEMPTED_EXIT_CODE} so the "
          "launcher reruns this command to resume.", file=sys.stderr, flush=True)
    sys.exit(trainer_lib.PREEMPTED_EXIT_CODE)


def entry_point():
  app.run(main)


if __name__ == "__main__":
  entry_point()
