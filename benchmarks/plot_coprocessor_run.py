"""Plots a finished coprocessor run: its held-out table and its training curve.

  python -m benchmarks.plot_coprocessor_run --workdir=runs/coprocessor --out=docs/coprocessor_default.png

Left: baseline vs augmented perplexity at each position after the augmentation point
(`<workdir>/eval_table.json`). Right: the training loss of the augmented ahead tokens and the frozen
baseline's NLL on the same traces, per logged step (the TensorBoard events under
`<workdir>/tensorboard`, read with TensorFlow's event reader).
"""

from __future__ import annotations

import argparse
import glob
import json
import os


def read_scalars(event_dir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from every event file in `event_dir`, sorted by step."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(event_dir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField("simple_value"):  # TF1-style summaries
          number = float(value.simple_value)
        elif value.metadata.plugin_data.plugin_name == "scalars":  # TF2 / clu metric writers
          number = float(tf.make_ndarray(value.tensor))
        else:
          continue
        scalars.setdefault(value.tag, []).append((int(event.step), number))
  if not scalars:
    raise ValueError(f"{event_dir}: no TensorBoard scalars; is it the workdir of a finished run?")
  return {tag: sorted(points) for tag, points in scalars.items()}


def plot(workdir: str, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  with open(os.path.join(workdir, "eval_table.json")) as f:
    table = json.load(f)
  scalars = read_scalars(os.path.join(workdir, "tensorboard"))
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  left.plot(table["positions"], table["baseline_ppl"], "o-", label="frozen decoder")
  left.plot(table["positions"], table["augmented_ppl"], "o-", label="with coprocessor latents")
  left.set_xlabel("position after the augmentation point")
  left.set_ylabel("held-out perplexity")
  left.set_title(f"held-out ({table['num_traces_scored']} augmentation points)")
  left.legend()
  for tag, label in (("train/ahead_nll", "augmented (trained)"),
                     ("train/baseline_ahead_nll", "frozen baseline, same traces")):
    if tag in scalars:
      steps, values = zip(*scalars[tag])
      right.plot(steps, values, ".-", label=label)
  right.set_xlabel("step")
  right.set_ylabel("mean NLL of the ahead tokens")
  right.set_title("training batches")
  right.legend()
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  figure.savefig(out, dpi=120)
  print(f"wrote {out}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="A finished coprocessor run's workdir.")
  parser.add_argument("--out", default="docs/coprocessor_default.png", help="PNG to write.")
  args = parser.parse_args()
  plot(args.workdir, args.out)


if __name__ == "__main__":
  main()
