#!/usr/bin/env python3
"""Runs a persona_jax gin job on one GPU host (one GPU or several), from this checkout.

  python launch/gpu.py --gpus=0,1,2,3 --gin_file=gin/coprocessor.gin --workdir=runs/coprocessor \
      [--mesh_tensor=2] [--install] [--gin_bindings='TrainConfig.num_steps=1000'] [--dry_run]

What it does (`--dry_run` prints these commands and runs nothing):
  1. with --install: `pip install -e .[cuda]` (jax with its CUDA 12 wheels);
  2. runs `python -m persona_jax.main` in one process that sees the chosen GPUs
     (CUDA_VISIBLE_DEVICES); the train step is sharded over them by the mesh
     (`TrainConfig.mesh_data/fsdp/tensor`: by default all GPUs on the data axis; --mesh_fsdp /
     --mesh_tensor put some on the other axes, and the data axis takes the rest).
Rerunning the same command resumes from the workdir's latest checkpoint; a SIGTERM saves one first.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gpus", default="0",
                      help="GPU ids for CUDA_VISIBLE_DEVICES, e.g. '0' or '0,1,2,3'.")
  parser.add_argument("--gin_file", action="append", required=True, help="Repeatable, in order.")
  parser.add_argument("--gin_bindings", action="append", default=[], help="Repeatable.")
  parser.add_argument("--workdir", required=True, help="Checkpoints, TensorBoard events, config.gin.")
  parser.add_argument("--mesh_fsdp", type=int, default=1, help="GPUs on the fsdp axis.")
  parser.add_argument("--mesh_tensor", type=int, default=1, help="GPUs on the tensor axis.")
  parser.add_argument("--memory_fraction", type=float, default=None,
                      help="XLA_PYTHON_CLIENT_MEM_FRACTION (JAX preallocates 75%% by default).")
  parser.add_argument("--python", default=sys.executable, help="The Python that runs the job.")
  parser.add_argument("--install", action="store_true", help="pip install -e .[cuda] first.")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
  args = parser.parse_args(argv)
  ids = args.gpus.split(",")
  if not all(i.strip().isdigit() for i in ids) or len(set(ids)) != len(ids):
    parser.error(f"--gpus={args.gpus}: give distinct GPU ids separated by commas, e.g. 0,1,2,3.")
  args.gpu_ids = [int(i) for i in ids]
  model_parallel = args.mesh_fsdp * args.mesh_tensor
  if args.mesh_fsdp < 1 or args.mesh_tensor < 1 or len(ids) % model_parallel:
    parser.error(f"--mesh_fsdp={args.mesh_fsdp} x --mesh_tensor={args.mesh_tensor} must divide the "
                 f"{len(ids)} GPU(s) of --gpus={args.gpus}.")
  if args.memory_fraction is not None and not 0 < args.memory_fraction <= 1:
    parser.error("--memory_fraction must be in (0, 1].")
  return args


def install_command(args) -> list[str]:
  return [args.python, "-m", "pip", "install", "-e", f"{REPO_ROOT}[cuda]"]


def mesh_bindings(args) -> list[str]:
  data = len(args.gpu_ids) // (args.mesh_fsdp * args.mesh_tensor)
  return [f"TrainConfig.mesh_data={data}", f"TrainConfig.mesh_fsdp={args.mesh_fsdp}",
          f"TrainConfig.mesh_tensor={args.mesh_tensor}"]


def job_environment(args) -> dict[str, str]:
  env = {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in args.gpu_ids), "JAX_PLATFORMS": "cuda"}
  if args.memory_fraction is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.memory_fraction)
  return env


def job_command(args) -> list[str]:
  """`env VAR=... python -m persona_jax.main ...`; the user's bindings come after the mesh's."""
  environment = [f"{k}={v}" for k, v in job_environment(args).items()]
  bindings = mesh_bindings(args) + args.gin_bindings
  return (["env", *environment, args.python, "-m", "persona_jax.main"]
          + [f"--gin_file={f}" for f in args.gin_file] + [f"--gin_bindings={b}" for b in bindings]
          + [f"--workdir={args.workdir}"])


def commands(args) -> list[list[str]]:
  return ([install_command(args)] if args.install else []) + [job_command(args)]


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.dry_run:
    for command in commands(args):
      print(shlex.join(command))
    return 0
  os.chdir(REPO_ROOT)
  for command in commands(args):
    print("+ " + shlex.join(command), flush=True)
    status = subprocess.call(command)
    if status != 0:
      return status
  return 0


if __name__ == "__main__":
  sys.exit(main())
