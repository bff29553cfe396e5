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

A rerun in the same workdir is checked against the first run's config and base model before any
work or write (`persona_jax.train.run_identity`): a change to what shapes the model, the data or the
base is refused, naming the bindings, unless `--allow_config_change`; config.gin stays the first
run's and a changed rerun's config is added as config.step<N>.gin. A SIGTERM anywhere in the run exits
with status 75 (inside the training loop after saving a checkpoint).

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
flags.DEFINE_bool("allow_config_change", False, "Continue a run in a workdir whose recorded config or "
                  "base model differs in what shapes the model, the data or the base (the new config "
                  "is kept as config.step<N>.gin beside the first run's config.gin).")
flags.DEFINE_bool("list_jobs", False, "List the registered methods (one line each) and the generic jobs, "
                  "then exit.")
flags.DEFINE_string("describe", None, "Print a method's gin configurables with their defaults "
                    "(e.g. --describe=coprocessor), then the core ones (DecoderSource, TrainConfig, ...), "
                    "and exit.")

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
  # Files first, then each --gin_bindings value on its own, so an error names the one that failed
  # (gin's own message says only "line 1" of the joined bindings).
  for source, apply in ([(f"--gin_file={path}", lambda path=path: gin.parse_config_file(path))
                         for path in files] +
                        [(f"--gin_bindings={binding!r}", lambda binding=binding: gin.parse_config(binding))
                         for binding in gin_bindings]):
    try:
      apply()
    except (ValueError, KeyError, SyntaxError, OSError, ImportError) as error:
      message = str(error).strip()
      raise UserError(f"Gin config could not be applied: {source} failed: {message}\nFix the binding "
                      "or gin file named above (check the configurable's name and its argument, and "
                      "that a value follows '='; a method's configurables exist only once its module "
                      "is imported).") from error
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


def write_config(workdir: str, text: str, name: str = "config.gin") -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    workdir_lib.write_text(workdir_lib.join(workdir, name), text)


def check_method_bindings() -> None:
  """Refuses a binding for a configurable of another method's room than `run.method`'s: the job would
  never read it (it used to be ignored and missing from config.gin). The core's configurables
  (TrainConfig, DecoderSource, run, rl.learner, ...) belong to every method."""
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  from persona_jax.train import method as method_lib  # pylint: disable=g-import-not-at-top

  selected = gin.query_parameter("run.method")
  names = method_lib.discover_methods()
  if selected not in names:
    raise UserError(f"run.method = {selected!r} is not a registered method; registered: {names} "
                    "(--list_jobs lists them).")

  def home(name: str) -> str:  # persona_jax.<room> for a room's job.py, the module for a core method
    module = method_lib.get_method(name).__module__
    return module.rsplit(".", 1)[0] if module.endswith(".job") else module

  own = home(selected)
  others = {home(name): name for name in names if home(name) != own}
  for (scope, selector), arguments in gin_config._CONFIG.items():  # pylint: disable=protected-access
    if selector == "gin.macro":
      continue
    configurable = gin_config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
    module = getattr(configurable.wrapped, "__module__", "") or ""
    for other, name in others.items():
      if module == other or module.startswith(other + "."):
        shown = gin_config._REGISTRY.minimal_selector(selector)  # pylint: disable=protected-access
        bound = ", ".join(f"{scope + '/' if scope else ''}{shown}.{arg}" for arg in arguments)
        raise UserError(f"Binding {bound} configures method {name!r} ({other}), but run.method = "
                        f"{selected!r}: that job never reads it. Fix: remove the binding (from "
                        f"--gin_bindings or the gin file), or select that method with "
                        f"--gin_bindings=\"run.method = '{name}'\".")


class Preempted(BaseException):
  """SIGTERM arrived outside a Trainer's loop (data setup, compile, evaluation, export of tables).

  A BaseException (as KeyboardInterrupt) so no `except Exception` on the way swallows it; `main` exits
  with `PREEMPTED_EXIT_CODE`. Inside the loop the Trainer's own handler takes over (it saves first).
  """


class _SigtermForTheWholeRun:
  """Installs a SIGTERM handler for the whole of `run_main` (issue 19): before, a SIGTERM during data
  setup, compilation or the final evaluation killed the process with the default action (status
  -15, no checkpoint logic). While a Trainer's loop runs, its own handler replaces this one (it saves
  a checkpoint after the current step and the job returns `preempted`); anywhere else this one raises
  `Preempted` at once: what was saved is kept (the loop always saves its final step before the final
  evaluation), and `main` exits 75 so the launcher reruns the command, which resumes."""

  def __init__(self):
    self.previous = None
    self.received = False

  def __enter__(self):
    import signal  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    if threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    if self.received:  # already unwinding: let the cleanup (checkpoint wait) finish
      return
    self.received = True
    raise Preempted("SIGTERM received outside the training loop; every checkpoint saved so far is "
                    "kept: rerun the same command to resume.")

  def __exit__(self, *exc):
    import signal  # pylint: disable=g-import-not-at-top
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


# Exceptions that come from bad flags, files, bindings or data rather than from bugs.
USER_ERROR_TYPES = (UserError,)


def run_main(gin_files: list[str], gin_bindings: list[str], workdir: str | None, *,
             allow_config_change: bool = False):
  """Everything `main` does, callable from Python (tests, notebooks)."""
  from persona_jax.train.partitioning import maybe_initialize_distributed  # pylint: disable=g-import-not-at-top

  workdir = prepare_workdir(workdir or default_workdir(gin_files))
  print(f"workdir: {workdir}", flush=True)
  maybe_initialize_distributed()
  import_job_modules()
  parse_gin(gin_files, gin_bindings)
  check_method_bindings()
  from persona_jax.train import jobs  # pylint: disable=g-import-not-at-top
  from persona_jax.train import run_identity  # pylint: disable=g-import-not-at-top

  # The run's identity is checked before anything is written (see persona_jax/train/run_identity.py):
  # config.gin stays the first run's; a changed rerun's config is added as config.step<N>.gin.
  decision = run_identity.check(workdir, allow_change=allow_config_change)
  for note in decision.notes:
    print(note, flush=True)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    run_identity.write(workdir, decision, gin.config_str())  # what was asked for; operative below
  with gin.unlock_config():
    result = jobs.run(workdir)
  if decision.config_file is not None:
    write_config(workdir, gin.operative_config_str(), decision.config_file)
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
  if FLAGS.list_jobs or FLAGS.describe:
    try:
      print(describe_jobs(FLAGS.describe), flush=True)
    except USER_ERROR_TYPES as error:
      print(f"error: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
      sys.exit(1)
    return
  try:
    with _SigtermForTheWholeRun():
      result = run_main(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.workdir,
                        allow_config_change=FLAGS.allow_config_change)
  except (trainer_lib.Preempted, Preempted) as error:  # raise_if_preempted(), or SIGTERM outside the loop
    print(f"preempted: {error}", file=sys.stderr, flush=True)
    sys.exit(trainer_lib.PREEMPTED_EXIT_CODE)
  except USER_ERROR_TYPES as error:
    if FLAGS.traceback:
      raise
    print(f"error: {type(error).__name__}: {error}\n(run with --traceback for the full traceback)",
          file=sys.stderr, flush=True)
    sys.exit(1)
  exit_if_preempted(result)


# --list_jobs / --describe ---------------------------------------------------------------------------
def describe_jobs(method: str | None = None) -> str:
  """`--list_jobs` (method None): every registered method with its one-line summary, and the generic
  jobs. `--describe=<method>`: the method's gin configurables as `<name>.<arg> = <default>` lines
  (the meaning from its docstring as a comment), then the core configurables every run takes
  (`DecoderSource`, `TrainConfig`, `run` / `train` / `evaluate`, the RL learner)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  from persona_jax.train import method as method_lib  # pylint: disable=g-import-not-at-top

  names = import_job_modules()
  registry = sorted((name, selectable) for name, selectable in gin_config._REGISTRY.items()  # pylint: disable=protected-access
                    if getattr(selectable.wrapped, "__module__", "").startswith("persona_jax"))

  def summary(obj) -> str:
    return (inspect.getdoc(obj) or "").strip().split("\n\n")[0].replace("\n", " ")

  def gin_name(full: str, selectable) -> str:  # the name a binding uses ('DecoderSource', 'coprocessor.job')
    module = selectable.module or ""
    return selectable.name if module.startswith("persona_jax") else full

  def arg_docs(obj) -> dict[str, str]:  # Google-style "Args:" / "Attributes:" entries, first line each
    docs, current = {}, []
    for line in (inspect.getdoc(obj) or "").splitlines():
      match = re.match(r"^  ([\w]+(?: / [\w]+)*): (.*)$", line)
      if match:
        current = [arg for arg in match.group(1).split(" / ") if arg not in docs]
        docs.update({arg: match.group(2).strip() for arg in current})
      elif line.startswith("    ") and current:  # an entry's continuation line
        docs.update({arg: docs[arg] + " " + line.strip() for arg in current})
      else:
        current = []
    return docs

  def bindings(full: str, selectable) -> list[str]:
    wrapped, prefix = selectable.wrapped, gin_name(full, selectable)
    docs = arg_docs(wrapped)
    factories = ({f.name: f.default_factory for f in dataclasses.fields(wrapped)
                  if f.default_factory is not dataclasses.MISSING}
                 if dataclasses.is_dataclass(wrapped) else {})
    lines = [f"# {prefix}: {summary(wrapped)}"]
    for arg in inspect.signature(wrapped).parameters.values():
      if arg.kind in (arg.VAR_POSITIONAL, arg.VAR_KEYWORD) or arg.name == "self":
        continue
      if arg.default is inspect.Parameter.empty and arg.name not in factories:
        continue  # passed by the caller (workdir, method), not a binding
      default = factories[arg.name]() if arg.name in factories else arg.default
      value = "%gin.REQUIRED" if default is gin.REQUIRED else repr(default)
      comment = f"  # {docs[arg.name]}" if arg.name in docs else ""
      lines.append(f"{prefix}.{arg.name} = {value}{comment}")
    return lines

  methods = {name: method_lib.get_method(name) for name in names}
  if method is None:
    width = max(map(len, names))
    out = ["Methods (run.method = '<name>'; --describe=<name> lists its configurables):"]
    out += [f"  {name:<{width}}  {summary(cls)}" for name, cls in methods.items()]
    out += ["Generic jobs (run.job = @<name>):"]
    out += [f"  {selectable.name:<{width}}  {summary(selectable.wrapped)}" for _, selectable in registry
            if selectable.wrapped.__module__ == "persona_jax.train.jobs" and selectable.name != "run"]
    return "\n".join(out)
  if method not in methods:
    raise UserError(f"--describe={method}: no such method; registered: {names} (--list_jobs).")
  cls = methods[method]
  room = cls.__module__.rsplit(".", 1)[0]
  others = {c for n, c in methods.items() if n != method}
  own = [(full, s) for full, s in registry if s.wrapped is cls]
  own += [(full, s) for full, s in registry if s.wrapped is not cls and s.wrapped not in others
          and s.wrapped.__module__.startswith(room + ".") and room != "persona_jax.train"]
  rooms = {c.__module__.rsplit(".", 1)[0] for c in methods.values()} - {"persona_jax.train"}
  core = [(full, s) for full, s in registry if s.wrapped not in methods.values()
          and not any(s.wrapped.__module__.startswith(r + ".") for r in rooms)]
  out = [f"# {method}: {summary(cls)}", f"run.method = {method!r}", ""]
  for full, selectable in own + core:
    out += bindings(full, selectable) + [""]
  return "\n".join(out).rstrip()


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
