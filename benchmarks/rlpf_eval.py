"""RLPF on held-out users: predictor accuracy from the full history vs a zero-shot summary vs the
RLPF summary; summary length and context reduction; training curves of reward and length.

  TFDS_DATA_DIR=../shared/tfds python -m benchmarks.rlpf_eval --steps 20 --out /tmp/rlpf_eval
  # smoke (a random tiny llama, a few steps, no plot):
  python -m benchmarks.rlpf_eval --model tiny_llama --steps 2 --num_train_users 4 \
      --num_eval_users 4 --batch_size 2 --max_summary_tokens 8 --target_length 4 --num_history 5 \
      --transfer_task '' --plot ''

Runs the RLPF method (`persona_jax.rlpf.job.RLPF` through `rl.Learner`, default SmolLM2-135M-Instruct
as summarizer and predictor, LoRA on the summarizer), then evaluates the held-out users of the training task and of
`--transfer_task` (the same summarizer, a task it was not trained on). Writes `<out>/rlpf_eval.json`,
`<out>/rlpf_eval.md` and the training-curve plot `docs/rlpf_training_curve.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(title: str, results: dict) -> list[str]:
  lines = [f"**{title}**", "", "| context | predictor accuracy | context tokens (mean) | "
           "reduction vs full history | empty summaries |", "|---|---|---|---|---|"]
  for name, row in results.items():
    reduction = f"{row['context_reduction']:.1f}x" if "context_reduction" in row else "1.0x"
    empty = f"{row['empty_summaries']:.2f}" if "empty_summaries" in row else "-"
    lines.append(f"| {name} | {row['accuracy']:.3f} | {row['context_tokens']:.1f} | {reduction} | "
                 f"{empty} |")
  return lines + [""]


def _plot(history: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [h["step"] for h in history]
  figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for axis, key, label in ((axes[0], "reward", "reward (incl. length term and KL)"),
                           (axes[1], "prediction_accuracy", "predictor accuracy on the summary"),
                           (axes[2], "summary_tokens", "summary length (tokens)")):
    axis.plot(steps, [h[key] for h in history], marker=".")
    axis.set_xlabel("RL step")
    axis.set_title(label, fontsize=10)
    axis.grid(alpha=0.3)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  figure.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pretrained", default="smollm2-135m-instruct")
  parser.add_argument("--model", default=None, help="a random preset instead (e.g. tiny_llama)")
  parser.add_argument("--task", default="movielens_future_movie")
  parser.add_argument("--transfer_task", default="movielens_favorite_genre",
                      help="also evaluate the trained summarizer on this task ('' to skip)")
  parser.add_argument("--num_history", type=int, default=50)
  parser.add_argument("--num_train_users", type=int, default=64)
  parser.add_argument("--num_eval_users", type=int, default=24)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--samples_per_prompt", type=int, default=1)
  parser.add_argument("--estimator", default="reinforce")
  parser.add_argument("--max_summary_tokens", type=int, default=128)
  parser.add_argument("--target_length", type=float, default=64)
  parser.add_argument("--length_weight", type=float, default=1.0)
  parser.add_argument("--lora_rank", type=int, default=8)
  parser.add_argument("--learning_rate", type=float, default=3e-4)
  parser.add_argument("--kl_reward_coefficient", type=float, default=0.01)
  parser.add_argument("--num_epochs", type=int, default=1, help="rl.learner.num_epochs")
  parser.add_argument("--num_minibatches", type=int, default=1, help="rl.learner.num_minibatches")
  parser.add_argument("--policy_loss", default="policy_gradient", help="'ppo' with --num_epochs > 1")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="/tmp/rlpf_eval")
  parser.add_argument("--plot", default=os.path.join(REPO, "docs", "rlpf_training_curve.png"))
  args = parser.parse_args()

  from persona_jax import rl
  from persona_jax.hf.source import DecoderSource
  from persona_jax.rlpf import eval as eval_lib
  from persona_jax.rlpf import tasks
  from persona_jax.rlpf.job import RLPF
  from persona_jax.train import TrainConfig, Trainer

  started = time.time()
  source = (DecoderSource(pretrained=None, preset=args.model, vocabulary="bytes") if args.model
            else DecoderSource(pretrained=args.pretrained))
  train_config = TrainConfig(num_steps=args.steps, learning_rate=args.learning_rate,
                             warmup_steps=min(2, args.steps - 1), checkpoint_every=0, log_every=1,
                             seed=args.seed)
  method = RLPF(
      decoder=source, task=args.task, num_history=args.num_history,
      num_train_users=args.num_train_users, num_eval_users=args.num_eval_users,
      max_summary_tokens=args.max_summary_tokens, batch_size=args.batch_size,
      samples_per_prompt=args.samples_per_prompt, estimator=args.estimator,
      lora_rank=args.lora_rank, kl_reward_coefficient=args.kl_reward_coefficient,
      length_weight=args.length_weight, target_length=args.target_length, seed=args.seed,
      learner=rl.LearnerConfig(num_epochs=args.num_epochs, num_minibatches=args.num_minibatches,
                               seed=args.seed))
  method.setup(None)
  description = method.description()
  built = time.time()
  print(f"rlpf_eval: {description}; built in {built - started:.0f} s", flush=True)
  trainer = Trainer(method.model(), rl.make_loss_fn(policy_loss=args.policy_loss), train_config,
                    trainable=method.trainable_filter())
  learner = rl.Learner(trainer, method.rollout_source(), method.learner_config)
  result = learner.train()
  trained = time.time()
  model = learner.trainer.model()
  evaluations = {args.task: method.evaluate(model, result.step).results["eval_table"]}
  if args.transfer_task:
    name = tasks.rlpf_task(args.transfer_task, num_history=args.num_history, seed=args.seed)
    evaluations[f"{args.transfer_task} (transfer)"] = eval_lib.evaluate_contexts(
        method.predictor, method.codec, tasks.load_examples(name, "test", limit=args.num_eval_users),
        {"zero_shot_summary": method.decoder, "rlpf_summary": model.decoder},
        max_summary_tokens=args.max_summary_tokens, batch_size=method.eval_batch_size)
  finished = time.time()

  history = [{k: h[k] for k in ("step", "reward", "prediction_accuracy", "summary_tokens",
                                "kl_to_reference", "value_loss", "empty_summary", "ratio_mean",
                                "clip_fraction", "approx_kl") if k in h}
             for h in result.history]
  os.makedirs(args.out, exist_ok=True)
  report = {"args": vars(args), "description": description, "history": history,
            "evaluations": evaluations,
            "seconds": {"build": built - started, "train": trained - built,
                        "evaluate": finished - trained},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  with open(os.path.join(args.out, "rlpf_eval.json"), "w") as f:
    json.dump(report, f, indent=2)
  lines = [f"RLPF held-out evaluation ({description}; {args.steps} steps x {args.batch_size} "
           f"users x {args.samples_per_prompt} summaries; {args.num_eval_users} held-out users)", ""]
  for title, results in evaluations.items():
    lines += _table(title, results)
  first, last = history[:max(1, len(history) // 4)], history[-max(1, len(history) // 4):]
  mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
  lines.append(f"Training: reward {mean(first, 'reward'):.3f} (first quarter of steps) -> "
               f"{mean(last, 'reward'):.3f} (last quarter); summary length "
               f"{mean(first, 'summary_tokens'):.1f} -> {mean(last, 'summary_tokens'):.1f} tokens; "
               f"train accuracy {mean(first, 'prediction_accuracy'):.3f} -> "
               f"{mean(last, 'prediction_accuracy'):.3f}.")
  lines.append(f"Time: build {built - started:.0f} s, train {trained - built:.0f} s, evaluate "
               f"{finished - trained:.0f} s.")
  markdown = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "rlpf_eval.md"), "w") as f:
    f.write(markdown)
  print(markdown, flush=True)
  if args.plot:
    _plot(history, args.plot, f"RLPF training ({description})")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
  main()
