#!/usr/bin/env python3
"""Runs a persona_jax gin job on a Cloud TPU VM (one host or a multi-host pod), resuming after preemption.

  python launch/tpu_pod.py --name=pj-v5e16 --zone=us-west4-a --accelerator_type=v5litepod-16 \
      --version=v2-alpha-tpuv5-lite --spot --gin_file=gin/coprocessor.gin \
      --workdir=gs://BUCKET/runs/coprocessor [--gin_bindings='TrainConfig.num_steps=1000'] [--dry_run]

What it does (`--dry_run` prints these commands and runs nothing):
  1. `gcloud compute tpus tpu-vm create` (spot or preemptible if asked), unless the VM is READY;
  2. packs this checkout (tar, without .git and runs/), copies it to every worker (`scp --worker=all`)
     and installs it there with `pip install -e .[tpu]`;
  3. runs the same `python -m persona_jax.main --gin_file=... --workdir=gs://...` on all workers
     (`ssh --worker=all`). `persona_jax.main` starts `jax.distributed` on a pod: the command exports
     TPU_WORKER_HOSTNAMES from the TPU metadata (when the image has not set it), which
     `persona_jax.train.partitioning.maybe_initialize_distributed` reads;
  4. if the job did not finish and the VM was preempted (state PREEMPTED / TERMINATED, or gone), it
     deletes and re-creates the VM, reinstalls, and runs the same command again: the trainer resumes
     from the latest checkpoint in the workdir (up to --max_restarts times). A job that fails on a
     READY VM (a bad config, a bug) is not retried: its exit status is returned.
Exit status of the job: 0 finished; 75 (`PREEMPTED_EXIT_CODE`: SIGTERM, checkpoint saved) preempted,
re-create if needed and resume; anything else a failure, returned as it is.

`--mode=queued` (production runs) uses queued resources instead of a VM and ssh:
  1. packs this checkout and copies it to `<workdir>/launch/persona_jax.tar.gz`;
  2. `gcloud compute tpus queued-resources create` with a startup script (`--node-count` N > 1 makes
     a multislice run over N slices), then waits for the state ACTIVE;
  3. the startup script, on every host, fetches the code, installs it, runs the job detached from this
     launcher, and copies its log to `<workdir>/launch/logs/attempt-<k>/` and its exit status to
     `<workdir>/launch/status/attempt-<k>/`; the launcher polls slice 0 / worker 0's status;
  4. the queued resource is deleted; on status 75 or a SUSPENDED / FAILED resource it is re-created
     and the job resumes from the workdir (up to --max_restarts times).

Before any cloud command (dry runs too) the gin files and bindings are parsed and validated here, in
this process, with persona_jax.main's own helpers: a bad config fails in seconds, not on a pod.
Needs persona_jax importable on the launching machine (`--skip_validation` to skip) and the gcloud CLI.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REMOTE_DIR = "persona_jax"  # under the worker's home directory
REMOTE_ARCHIVE = "persona_jax.tar.gz"
PREEMPTED_STATES = ("PREEMPTED", "TERMINATED", "STOPPED")
# persona_jax.train.trainer.PREEMPTED_EXIT_CODE (sysexits' EX_TEMPFAIL): the job saved a checkpoint
# after SIGTERM and should be rerun to resume. Kept here so the launcher does not import the trainer.
PREEMPTED_EXIT_CODE = 75
QUEUED_GONE_STATES = ("SUSPENDING", "SUSPENDED", "FAILED", "DELETING")
POLL_SECONDS = int(os.environ.get("PERSONA_JAX_LAUNCH_POLL_SECONDS", "60"))  # tests poll faster
# What jax's own Cloud TPU cluster detection reads: `worker-network-endpoints` is
# "id:hostname:ip,..." per worker.
_WORKER_HOSTNAMES = (
    'export TPU_WORKER_HOSTNAMES="${TPU_WORKER_HOSTNAMES:-$(curl -s -H Metadata-Flavor:Google '
    'http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints'
    ' | tr , "\\n" | cut -d: -f3 | paste -sd, -)}"')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name", required=True, help="TPU VM name.")
  parser.add_argument("--zone", required=True, help="e.g. us-west4-a.")
  parser.add_argument("--project", default=None, help="GCP project (default: gcloud's).")
  parser.add_argument("--accelerator_type", required=True, help="e.g. v4-32, v5litepod-16, v6e-8.")
  parser.add_argument("--version", required=True,
                      help="TPU software version, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite.")
  capacity = parser.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="Spot VM (cheap, preemptible at any time).")
  capacity.add_argument("--preemptible", action="store_true", help="Preemptible VM (older flavor).")
  parser.add_argument("--gin_file", action="append", required=True, help="Repeatable, in order.")
  parser.add_argument("--gin_bindings", action="append", default=[], help="Repeatable.")
  parser.add_argument("--workdir", required=True,
                      help="gs://BUCKET/PATH: checkpoints must outlive a preempted VM.")
  parser.add_argument("--max_restarts", type=int, default=20,
                      help="Re-creations after preemption before giving up.")
  parser.add_argument("--delete_when_done", action="store_true",
                      help="Delete the VM once the job has finished.")
  parser.add_argument("--archive", default=None,
                      help="Local path of the packed checkout (default: /tmp/persona_jax-<name>.tar.gz).")
  parser.add_argument("--mode", choices=("ssh", "queued"), default="ssh",
                      help="ssh: a TPU VM driven over ssh (quick experiments); queued: queued "
                      "resources with a startup script, detached (production, multislice).")
  parser.add_argument("--node_count", type=int, default=1,
                      help="--mode=queued: slices; > 1 is a multislice run (`--node-count`).")
  parser.add_argument("--skip_validation", action="store_true",
                      help="Do not parse the gin config locally first.")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
  args = parser.parse_args(argv)
  if args.node_count < 1:
    parser.error("--node_count must be >= 1.")
  if args.node_count > 1 and args.mode != "queued":
    parser.error("--node_count > 1 (multislice) needs --mode=queued.")
  if not args.workdir.startswith("gs://"):
    parser.error(f"--workdir={args.workdir}: use a gs:// path, so a re-created VM finds the "
                 "checkpoints of the preempted one.")
  if args.max_restarts < 0:
    parser.error("--max_restarts must be >= 0.")
  return args


def _location(args) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def describe_command(args) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_location(args),
          "--format=value(state)"]


def create_command(args) -> list[str]:
  command = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_location(args),
             f"--accelerator-type={args.accelerator_type}", f"--version={args.version}"]
  if args.spot:
    command.append("--spot")
  if args.preemptible:
    command.append("--preemptible")
  return command


def delete_command(args) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_location(args), "--quiet"]


def archive_path(args) -> str:
  return args.archive or f"/tmp/persona_jax-{args.name}.tar.gz"


def pack_command(args) -> list[str]:
  return ["tar", "-czf", archive_path(args), "--exclude-vcs", "--exclude=./runs",
          "--exclude=./*.egg-info", "--exclude=__pycache__", "-C", str(REPO_ROOT), "."]


def copy_command(args) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive_path(args),
          f"{args.name}:{REMOTE_ARCHIVE}", *_location(args), "--worker=all"]


def ssh_command(args, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_location(args), "--worker=all",
          f"--command={remote}"]


def install_command(args) -> list[str]:
  remote = (f"set -e; rm -rf ~/{REMOTE_DIR}; mkdir -p ~/{REMOTE_DIR}; "
            f"tar -xzf ~/{REMOTE_ARCHIVE} -C ~/{REMOTE_DIR}; cd ~/{REMOTE_DIR}; "
            "python3 -m pip install --quiet -e '.[tpu]'")
  return ssh_command(args, remote)


def job_command(args) -> list[str]:
  """`python -m persona_jax.main ...` as one shell-quoted line (what every worker runs)."""
  return (["python3", "-m", "persona_jax.main"] + [f"--gin_file={f}" for f in args.gin_file]
          + [f"--gin_bindings={b}" for b in args.gin_bindings] + [f"--workdir={args.workdir}"])


def run_command(args) -> list[str]:
  remote = f"cd ~/{REMOTE_DIR}; {_WORKER_HOSTNAMES}; {shlex.join(job_command(args))}"
  return ssh_command(args, remote)


def validate_gin(args) -> None:
  """Parses the job's gin files and bindings in this process, as `persona_jax.main` will on the pod
  (a missing file, an unknown configurable or a bad value fail here, before any cloud command)."""
  if args.skip_validation:
    return
  sys.path.insert(0, str(REPO_ROOT))
  try:
    import gin  # pylint: disable=g-import-not-at-top
    from persona_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise SystemExit(f"Cannot validate the gin config locally ({error}): pip install -e . here, or "
                     "pass --skip_validation.") from error
  main_lib.import_job_modules()
  try:
    main_lib.parse_gin(args.gin_file, args.gin_bindings)
  except main_lib.UserError as error:
    raise SystemExit(f"error: the gin config does not parse, nothing was launched:\n{error}") from None
  finally:
    gin.clear_config()


# Queued resources (--mode=queued) ------------------------------------------------------------------
def queued_id(args) -> str:
  return f"{args.name}-qr"


def launch_dir(args) -> str:
  return args.workdir.rstrip("/") + "/launch"


def status_url(args, attempt: int) -> str:
  """What slice 0 / worker 0 writes its job's exit status to."""
  return f"{launch_dir(args)}/status/attempt-{attempt}/slice-0-worker-0"


def startup_script(args, attempt: int) -> str:
  """Runs on every host at boot: fetch the code, install, run the job, ship log and exit status."""
  code_url = f"{launch_dir(args)}/{REMOTE_ARCHIVE}"
  logs = f"{launch_dir(args)}/logs/attempt-{attempt}"
  status = f"{launch_dir(args)}/status/attempt-{attempt}"
  metadata = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"
  return "\n".join([
      "#!/bin/bash",
      "# persona_jax job (written by launch/tpu_pod.py --mode=queued).",
      f"WORKER=$(curl -s -H Metadata-Flavor:Google {metadata}/agent-worker-number || echo 0)",
      "SLICE=${MEGASCALE_SLICE_ID:-0}",
      "HOST=slice-${SLICE}-worker-${WORKER}",
      f"mkdir -p /tmp/{REMOTE_DIR} && cd /tmp/{REMOTE_DIR}",
      f"gcloud storage cp {code_url} /tmp/{REMOTE_ARCHIVE}",
      f"tar -xzf /tmp/{REMOTE_ARCHIVE} -C /tmp/{REMOTE_DIR}",
      "python3 -m pip install --quiet -e '.[tpu]' > /tmp/install.log 2>&1",
      _WORKER_HOSTNAMES,
      # The log reaches the workdir while the job runs (every minute) and once more at the end.
      f"(while sleep 60; do gcloud storage cp /tmp/job.log {logs}/$HOST.log > /dev/null 2>&1; "
      "done) &",
      "COPIER=$!",
      f"{shlex.join(job_command(args))} > /tmp/job.log 2>&1",
      "STATUS=$?",
      "kill $COPIER 2> /dev/null",
      f"gcloud storage cp /tmp/job.log {logs}/$HOST.log",
      f"echo $STATUS | gcloud storage cp - {status}/$HOST",
  ]) + "\n"


def startup_script_path(args, attempt: int) -> str:
  return f"/tmp/persona_jax-{args.name}-startup-{attempt}.sh"


def upload_code_command(args) -> list[str]:
  return ["gcloud", "storage", "cp", archive_path(args), f"{launch_dir(args)}/{REMOTE_ARCHIVE}"]


def queued_create_command(args, attempt: int) -> list[str]:
  command = ["gcloud", "compute", "tpus", "queued-resources", "create", queued_id(args),
             *_location(args), f"--accelerator-type={args.accelerator_type}",
             f"--runtime-version={args.version}",
             f"--metadata-from-file=startup-script={startup_script_path(args, attempt)}"]
  if args.node_count > 1:
    command += [f"--node-count={args.node_count}", f"--node-prefix={args.name}"]
  else:
    command.append(f"--node-id={args.name}")
  if args.spot or args.preemptible:
    command.append("--spot")
  return command


def queued_describe_command(args) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", queued_id(args),
          *_location(args), "--format=value(state.state)"]


def queued_delete_command(args) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "delete", queued_id(args),
          *_location(args), "--force", "--quiet"]


def read_status_command(args, attempt: int) -> list[str]:
  return ["gcloud", "storage", "cat", status_url(args, attempt)]


def queued_state(args) -> str | None:
  result = subprocess.run(queued_describe_command(args), capture_output=True, text=True)
  if result.returncode != 0:
    if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
      return None
    raise SystemExit(f"gcloud describe failed: {result.stderr.strip()}")
  return result.stdout.strip() or None


def job_status(args, attempt: int) -> int | None:
  """Slice 0 / worker 0's exit status of `attempt`, or None while the job runs."""
  result = subprocess.run(read_status_command(args, attempt), capture_output=True, text=True)
  text = result.stdout.strip()
  return int(text) if result.returncode == 0 and text.lstrip("-").isdigit() else None


def dry_run_queued(args) -> None:
  print("# 1. pack this checkout and copy it to the workdir")
  print(shlex.join(pack_command(args)))
  print(shlex.join(upload_code_command(args)))
  print("# 2. the queued resource, with this startup script (attempt 0; every host runs it at boot):")
  for line in startup_script(args, 0).splitlines():
    print(f"#| {line}")
  print(shlex.join(queued_create_command(args, 0)))
  print("# 3. poll until ACTIVE, then until the job's exit status appears (0 done, 75 preempted)")
  print(shlex.join(queued_describe_command(args)))
  print(shlex.join(read_status_command(args, 0)))
  print("# 4. delete it (after status 75 or SUSPENDED / FAILED: re-created with attempt-1, ...)")
  print(shlex.join(queued_delete_command(args)))


def launch_queued(args) -> int:
  _check(pack_command(args))
  _check(upload_code_command(args))
  for attempt in range(args.max_restarts + 1):
    if queued_state(args) is not None:
      _check(queued_delete_command(args))
    with open(startup_script_path(args, attempt), "w") as script:
      script.write(startup_script(args, attempt))
    _check(queued_create_command(args, attempt))
    status = None
    while status is None:
      state = queued_state(args)
      if state is None or state in QUEUED_GONE_STATES:
        print(f"queued resource {state or 'gone'}: preempted; re-creating and resuming.", flush=True)
        break
      if state == "ACTIVE":
        status = job_status(args, attempt)
      if status is None:
        time.sleep(POLL_SECONDS)
    if status is None:
      continue
    _check(queued_delete_command(args))
    if status == 0:
      print(f"job finished (attempt {attempt + 1}); logs in {launch_dir(args)}/logs", flush=True)
      return 0
    if status != PREEMPTED_EXIT_CODE:
      print(f"job failed with status {status}: not a preemption, not retried; logs in "
            f"{launch_dir(args)}/logs/attempt-{attempt}", file=sys.stderr, flush=True)
      return status
    print(f"job exited {PREEMPTED_EXIT_CODE} (preempted, checkpoint saved): re-creating and resuming.",
          flush=True)
  print(f"gave up after {args.max_restarts} restarts; the workdir holds the last checkpoint.",
        file=sys.stderr, flush=True)
  return 1


def _run(command: list[str]) -> int:
  print("+ " + shlex.join(command), flush=True)
  return subprocess.call(command)


def _check(command: list[str]) -> None:
  if _run(command) != 0:
    raise SystemExit(f"failed: {shlex.join(command)}")


def vm_state(args) -> str | None:
  """The VM's state (READY, CREATING, PREEMPTED, ...), or None when it does not exist."""
  result = subprocess.run(describe_command(args), capture_output=True, text=True)
  if result.returncode != 0:
    if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
      return None
    raise SystemExit(f"gcloud describe failed: {result.stderr.strip()}")
  return result.stdout.strip() or None


def ensure_vm(args) -> bool:
  """Makes the VM READY (creating or re-creating it). Returns True when it is new (needs install)."""
  state = vm_state(args)
  if state == "READY":
    return False
  if state is not None:
    if state in ("CREATING", "STARTING", "RESTARTING", "REPAIRING"):
      while state not in ("READY",) + PREEMPTED_STATES:
        time.sleep(30)
        state = vm_state(args)
      if state == "READY":
        return True
    _check(delete_command(args))
  _check(create_command(args))
  return True


def dry_run(args) -> None:
  print("# 1. create the TPU VM (skipped when `describe` says READY; deleted first when PREEMPTED)")
  for command in (describe_command(args), create_command(args)):
    print(shlex.join(command))
  print("# 2. pack this checkout, copy it to every worker, install it")
  for command in (pack_command(args), copy_command(args), install_command(args)):
    print(shlex.join(command))
  print("# 3. the job on all workers (repeated after a preemption: it resumes from the workdir)")
  print(shlex.join(run_command(args)))
  if args.delete_when_done:
    print("# 4. when it has finished")
    print(shlex.join(delete_command(args)))


def launch(args) -> int:
  _check(pack_command(args))
  for attempt in range(args.max_restarts + 1):
    if ensure_vm(args):
      _check(copy_command(args))
      _check(install_command(args))
    status = _run(run_command(args))
    if status == 0:
      print(f"job finished (attempt {attempt + 1}); workdir {args.workdir}", flush=True)
      if args.delete_when_done:
        _check(delete_command(args))
      return 0
    state = vm_state(args)
    if status == PREEMPTED_EXIT_CODE:  # SIGTERM, checkpoint saved: rerun (on a new VM if needed)
      print(f"job exited {status} (preempted, checkpoint saved); VM state {state}: resuming.",
            flush=True)
      continue
    if state == "READY":
      print(f"job failed with status {status} on a READY VM: not a preemption, not retried.",
            file=sys.stderr, flush=True)
      return status
    print(f"VM state {state} after status {status}: preempted; re-creating and resuming.", flush=True)
  print(f"gave up after {args.max_restarts} restarts; the workdir holds the last checkpoint.",
        file=sys.stderr, flush=True)
  return 1


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  validate_gin(args)  # before any cloud command, dry runs included
  if args.dry_run:
    (dry_run_queued if args.mode == "queued" else dry_run)(args)
    return 0
  os.chdir(REPO_ROOT)
  return launch_queued(args) if args.mode == "queued" else launch(args)


if __name__ == "__main__":
  sys.exit(main())
