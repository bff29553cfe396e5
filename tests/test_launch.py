"""Launchers: the dry runs print valid commands; the TPU resume loop re-creates a preempted VM.

The commands are parsed back with shlex (the remote `--command` a second time, as the worker's shell
would) and their flags checked; the job's own flags and gin bindings are checked against
`persona_jax.main` and gin. The resume loop runs against a fake `gcloud` on PATH that records its calls
and plays a preemption.
"""

import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys

import gin
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO_ROOT / "launch" / "tpu_pod.py"
GPU = REPO_ROOT / "launch" / "gpu.py"
TPU_ARGS = ["--name=pj-test", "--zone=us-west4-a", "--accelerator_type=v5litepod-16",
            "--version=v2-alpha-tpuv5-lite", "--gin_file=gin/coprocessor_smoke.gin",
            "--gin_bindings=coprocessor.job.variant = 'lora'", "--workdir=gs://bucket/runs/smoke"]


def _run(script, args, **kwargs):
  return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                        cwd=REPO_ROOT, **kwargs)


def _commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _flags(command: list[str]) -> dict[str, list[str]]:
  found = {}
  for arg in command:
    if arg.startswith("--"):
      name, _, value = arg.partition("=")
      found.setdefault(name, []).append(value)
  return found


def _check_job_argv(argv: list[str]):
  """The job's argv: persona_jax.main's flags only; its gin files and bindings parse with gin."""
  from persona_jax import main as main_lib

  assert argv[1:3] == ["-m", "persona_jax.main"]
  flags = _flags(argv[3:])
  assert set(flags) <= {"--gin_file", "--gin_bindings", "--workdir"}
  assert all(name[2:] in main_lib.FLAGS for name in flags)
  main_lib.import_job_modules()
  try:
    main_lib.parse_gin(flags["--gin_file"], flags.get("--gin_bindings", []))
  finally:
    gin.clear_config()
  return flags


def test_tpu_dry_run_prints_valid_commands():
  result = _run(TPU, TPU_ARGS + ["--spot", "--dry_run", "--delete_when_done"])
  assert result.returncode == 0, result.stderr
  describe, create, pack, copy, install, run, delete = _commands(result.stdout)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pj-test"]
  assert _flags(create) == {"--zone": ["us-west4-a"], "--accelerator-type": ["v5litepod-16"],
                            "--version": ["v2-alpha-tpuv5-lite"], "--spot": [""]}
  assert describe[4] == "describe" and _flags(describe)["--format"] == ["value(state)"]
  assert pack[:3] == ["tar", "-czf", "/tmp/persona_jax-pj-test.tar.gz"]
  assert pack[-3:] == ["-C", str(REPO_ROOT), "."] and "--exclude-vcs" in pack
  assert copy[4] == "scp" and copy[6] == "pj-test:persona_jax.tar.gz"
  for command in (copy, install, run):
    assert _flags(command)["--worker"] == ["all"] and _flags(command)["--zone"] == ["us-west4-a"]
  assert install[4] == "ssh" and "pip install --quiet -e '.[tpu]'" in _flags(install)["--command"][0]
  remote = _flags(run)["--command"][0]
  statements = [shlex.split(part) for part in remote.split("; ")]
  assert statements[0] == ["cd", "~/persona_jax"]
  assert statements[1][0] == "export" and statements[1][1].startswith("TPU_WORKER_HOSTNAMES=")
  job = _check_job_argv(statements[-1])
  assert job["--gin_bindings"] == ["coprocessor.job.variant = 'lora'"]
  assert job["--workdir"] == ["gs://bucket/runs/smoke"]
  assert delete[4] == "delete" and "--quiet" in delete


def test_tpu_preemptible_flag_and_user_errors():
  result = _run(TPU, TPU_ARGS + ["--preemptible", "--dry_run"])
  create = _commands(result.stdout)[1]
  assert "--preemptible" in create and "--spot" not in create
  result = _run(TPU, [a for a in TPU_ARGS if not a.startswith("--workdir")]
                + ["--workdir=/tmp/local", "--dry_run"])
  assert result.returncode == 2 and "use a gs:// path" in result.stderr
  assert _run(TPU, TPU_ARGS + ["--spot", "--preemptible", "--dry_run"]).returncode == 2


FAKE_GCLOUD = r'''#!{python}
"""Records each call; plays a TPU VM that is preempted during the first run of the job."""
import json, os, sys
state_file = os.environ["FAKE_GCLOUD_STATE"]
state = json.load(open(state_file)) if os.path.exists(state_file) else {{"vm": None, "runs": 0}}
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
  log.write(json.dumps(args) + "\n")
code = 0
if args[0] == "storage":  # the queued path: code upload, job status of attempt-K
  if args[1] == "cat":
    attempt = int(args[2].split("attempt-")[1].split("/")[0])
    print(75 if attempt == 0 else os.environ.get("FAKE_JOB_STATUS", "0"))
  sys.exit(0)
verb = args[3]
if args[2] == "queued-resources":
  if verb == "describe":
    if state.get("qr") is None:
      sys.stderr.write("ERROR: NOT_FOUND\n"); code = 1
    else:
      print(state["qr"])
  elif verb == "create":
    state["qr"] = "ACTIVE"
  elif verb == "delete":
    state["qr"] = None
  json.dump(state, open(state_file, "w"))
  sys.exit(code)
if verb == "describe":
  if state["vm"] is None:
    sys.stderr.write("ERROR: NOT_FOUND: tpu not found\n"); code = 1
  else:
    print(state["vm"])
elif verb == "create":
  state["vm"] = "READY"
elif verb == "delete":
  state["vm"] = None
elif verb == "ssh" and "persona_jax.main" in args[-1]:
  state["runs"] += 1
  if state["runs"] == 1 and os.environ.get("FAKE_FIRST_RUN") == "sigterm":
    code = 75  # SIGTERM (e.g. maintenance): checkpoint saved, the VM stays READY
  elif state["runs"] == 1:
    state["vm"] = "PREEMPTED"; code = 255
  else:
    code = int(os.environ.get("FAKE_JOB_STATUS", "0"))
json.dump(state, open(state_file, "w"))
sys.exit(code)
'''


def _fake_gcloud(tmp_path, job_status=0, first_run="preempted"):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             FAKE_GCLOUD_STATE=str(tmp_path / "state.json"), FAKE_GCLOUD_LOG=str(tmp_path / "log"),
             FAKE_JOB_STATUS=str(job_status), FAKE_FIRST_RUN=first_run,
             PERSONA_JAX_LAUNCH_POLL_SECONDS="0")
  return env


def _verbs(tmp_path):
  calls = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
  return [("storage:" + c[1]) if c[0] == "storage" else
          ("qr:" if c[2] == "queued-resources" else "") + c[3] +
          (":job" if c[3] == "ssh" and "persona_jax.main" in c[-1] else "") for c in calls]


@pytest.mark.parametrize("job_status", [0, 1])
def test_tpu_resume_loop_recreates_a_preempted_vm(tmp_path, job_status):
  env = _fake_gcloud(tmp_path, job_status)
  result = _run(TPU, TPU_ARGS + ["--spot", "--skip_validation", f"--archive={tmp_path / 'code.tar.gz'}"],
                env=env)
  assert (tmp_path / "code.tar.gz").stat().st_size > 0
  first = ["describe", "create", "scp", "ssh", "ssh:job", "describe"]
  # Preempted: the VM is deleted, re-created, reinstalled, and the same job runs again (resuming).
  again = ["describe", "delete", "create", "scp", "ssh", "ssh:job"]
  if job_status == 0:
    assert result.returncode == 0, result.stderr
    assert _verbs(tmp_path) == first + again
  else:  # a failure on a READY VM is the job's own: reported, not retried
    assert result.returncode == 1 and "not retried" in result.stderr
    assert _verbs(tmp_path) == first + again + ["describe"]


def test_tpu_exit_75_on_a_ready_vm_resumes_without_recreating(tmp_path):
  env = _fake_gcloud(tmp_path, 0, first_run="sigterm")
  result = _run(TPU, TPU_ARGS + ["--skip_validation", f"--archive={tmp_path / 'code.tar.gz'}"], env=env)
  assert result.returncode == 0, result.stderr
  assert "preempted, checkpoint saved" in result.stdout
  assert _verbs(tmp_path) == ["describe", "create", "scp", "ssh", "ssh:job", "describe",
                              "describe", "ssh:job"]


@pytest.mark.parametrize("args", [["--gin_file=gin/no_such_job.gin"],
                                  ["--gin_bindings=coprocessor.job.no_such_parameter = 3"]],
                         ids=["missing_file", "bad_binding"])
@pytest.mark.parametrize("mode", ["ssh", "queued"])
def test_a_bad_gin_config_fails_the_dry_run_before_any_cloud_command(args, mode):
  base = [a for a in TPU_ARGS if not (args[0].startswith("--gin_file") and a.startswith("--gin_file"))]
  result = _run(TPU, base + args + [f"--mode={mode}", "--dry_run"])
  assert result.returncode != 0
  assert "gcloud" not in result.stdout and "nothing was launched" in result.stderr


def _startup_script(stdout: str) -> list[str]:
  return [line[len("#| "):] for line in stdout.splitlines() if line.startswith("#| ")]


@pytest.mark.parametrize("node_count", [1, 2])
def test_tpu_queued_dry_run_prints_valid_commands_and_startup_script(node_count):
  result = _run(TPU, TPU_ARGS + ["--mode=queued", f"--node_count={node_count}", "--spot", "--dry_run"])
  assert result.returncode == 0, result.stderr
  pack, upload, create, describe, status, delete = _commands(result.stdout)
  assert pack[:2] == ["tar", "-czf"]
  assert upload == ["gcloud", "storage", "cp", "/tmp/persona_jax-pj-test.tar.gz",
                    "gs://bucket/runs/smoke/launch/persona_jax.tar.gz"]
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pj-test-qr"]
  flags = _flags(create)
  assert flags["--accelerator-type"] == ["v5litepod-16"] and flags["--spot"] == [""]
  assert flags["--runtime-version"] == ["v2-alpha-tpuv5-lite"]
  assert flags["--metadata-from-file"] == ["startup-script=/tmp/persona_jax-pj-test-startup-0.sh"]
  if node_count > 1:  # multislice
    assert flags["--node-count"] == ["2"] and flags["--node-prefix"] == ["pj-test"]
    assert "--node-id" not in flags
  else:
    assert flags["--node-id"] == ["pj-test"] and "--node-count" not in flags
  assert describe[4] == "describe" and _flags(describe)["--format"] == ["value(state.state)"]
  assert status == ["gcloud", "storage", "cat",
                    "gs://bucket/runs/smoke/launch/status/attempt-0/slice-0-worker-0"]
  assert delete[4] == "delete" and "--force" in delete and "--quiet" in delete
  script = _startup_script(result.stdout)
  assert script[0] == "#!/bin/bash"
  job_lines = [line for line in script if "persona_jax.main" in line]
  assert len(job_lines) == 1
  job_argv = shlex.split(job_lines[0])
  assert job_argv[-2:] == [">", "/tmp/job.log"] or job_argv[-3:-1] == [">", "/tmp/job.log"]
  job = _check_job_argv(job_argv[:job_argv.index(">")])
  assert job["--workdir"] == ["gs://bucket/runs/smoke"]
  assert any(line.endswith("/launch/status/attempt-0/$HOST") and "$STATUS" in line for line in script)
  assert any("/launch/logs/attempt-0/$HOST.log" in line for line in script)


def test_node_count_needs_the_queued_mode():
  result = _run(TPU, TPU_ARGS + ["--node_count=2", "--dry_run"])
  assert result.returncode == 2 and "needs --mode=queued" in result.stderr


@pytest.mark.parametrize("job_status", [0, 3])
def test_tpu_queued_loop_recreates_after_exit_75(tmp_path, job_status):
  env = _fake_gcloud(tmp_path, job_status)
  result = _run(TPU, TPU_ARGS + ["--mode=queued", "--skip_validation", f"--name=pj-q{job_status}",
                                 f"--archive={tmp_path / 'code.tar.gz'}"], env=env)
  first = ["storage:cp", "qr:describe", "qr:create", "qr:describe", "storage:cat", "qr:delete"]
  # Exit 75 (preempted after a checkpoint): re-created with a new startup script, resumed.
  again = ["qr:describe", "qr:create", "qr:describe", "storage:cat", "qr:delete"]
  assert _verbs(tmp_path) == first + again
  assert pathlib.Path(f"/tmp/persona_jax-pj-q{job_status}-startup-1.sh").read_text().count(
      "attempt-1") >= 2
  if job_status == 0:
    assert result.returncode == 0, result.stderr
  else:  # a failure is the job's own: reported, not retried
    assert result.returncode == 3 and "not retried" in result.stderr


def test_gpu_dry_run_prints_valid_commands():
  result = _run(GPU, ["--gpus=0,1,2,3", "--mesh_tensor=2", "--install", "--memory_fraction=0.9",
                      "--gin_file=gin/coprocessor_smoke.gin", "--workdir=runs/smoke",
                      "--gin_bindings=TrainConfig.num_steps = 7", "--dry_run"])
  assert result.returncode == 0, result.stderr
  install, job = _commands(result.stdout)
  assert install[1:5] == ["-m", "pip", "install", "-e"] and install[5] == f"{REPO_ROOT}[cuda]"
  assert job[0] == "env"
  environment = dict(item.split("=", 1) for item in job[1:4])
  assert environment == {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "JAX_PLATFORMS": "cuda",
                         "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
  flags = _check_job_argv(job[4:])
  assert flags["--gin_bindings"] == ["TrainConfig.mesh_data=2", "TrainConfig.mesh_fsdp=1",
                                     "TrainConfig.mesh_tensor=2", "TrainConfig.num_steps = 7"]
  assert flags["--workdir"] == ["runs/smoke"]


def test_gpu_rejects_a_mesh_that_does_not_divide_the_gpus():
  result = _run(GPU, ["--gpus=0,1,2", "--mesh_tensor=2", "--gin_file=gin/coprocessor_smoke.gin",
                      "--workdir=runs/smoke", "--dry_run"])
  assert result.returncode == 2 and "must divide the 3 GPU(s)" in result.stderr
  result = _run(GPU, ["--gpus=0,0", "--gin_file=gin/coprocessor_smoke.gin", "--workdir=w", "--dry_run"])
  assert result.returncode == 2 and "distinct GPU ids" in result.stderr


MODEL_FILES = sorted((REPO_ROOT / "gin" / "models").glob("*.gin"))


@pytest.mark.parametrize("model_file", MODEL_FILES, ids=lambda p: p.stem)
def test_model_files_set_the_one_decoder_source_after_any_job_file(model_file):
  """A model file is a few lines naming a model; every method reads it through DecoderSource."""
  import inspect

  from persona_jax import main as main_lib
  from persona_jax.hf.source import DecoderSource
  from persona_jax.train import method as method_lib

  text = model_file.read_text()
  expected = {line.split(" = ")[0].split(".")[-1]: eval(line.split(" = ")[1])  # noqa: S307
              for line in text.splitlines() if line.startswith("DecoderSource.")}
  assert set(expected) == {"pretrained", "preset", "vocabulary"}
  assert all(line.startswith(("#", "DecoderSource.")) or not line.strip() for line in text.splitlines())
  names = main_lib.import_job_modules()
  for name in names:  # no method takes a decoder source of its own
    parameters = inspect.signature(method_lib.get_method(name).__init__).parameters
    assert not {"pretrained", "model", "vocabulary"} & set(parameters), name
  for job_file in sorted((REPO_ROOT / "gin").glob("*.gin")):
    try:
      main_lib.parse_gin([str(job_file), str(model_file)], [])
      source = DecoderSource()
    finally:
      gin.clear_config()
    assert {k: getattr(source, k) for k in expected} == expected, (job_file.name, model_file.name)
