r"""persona_jax vs Hugging Face transformers (PyTorch, CPU) on the same weights, in one run.

Measures, for the same pretrained decoder loaded by both (default SmolLM2-135M-Instruct from its
GGUF, fp32 on both sides):
  * forward tokens/s over a `[batch, seq]` block (default 4 x 256, logits at every position);
  * greedy generation tokens/s at batch 1 and batch 8, 64 new tokens each (no early stop: both sides
    generate exactly `new_tokens` per row, prefill included in the time);
  * achieved model FLOP/s as a fraction of the machine's own fp32 matmul peak, measured in the same
    run in both jax and torch (the larger of the two is the peak);
  * decode weights (`--weight_formats`, persona_jax.nn.quantization): for each of fp32, bf16 and int8
    weight-only, greedy tokens/s at each batch, the speed-up over transformers.generate (fp32), the
    fraction of the memory-bandwidth bound (each decode step reads every weight once; the bound is a
    streaming read of the same weight arrays, measured in the same run), greedy agreement with our
    fp32 tokens (up to fp32's first EOS) and the max |logit difference| vs fp32 on the prompts'
    next-token logits.
Compilation is excluded (one warm-up call); each figure is the median of `--reps` timed calls.

Run from the repository root:
  python -m benchmarks.decoder_vs_hf
  python -m benchmarks.decoder_vs_hf --reps 5 --generate_batches 1,4,8
  python -m benchmarks.decoder_vs_hf --reps 1 --weight_formats float32,int8
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import (forward_flops, generation_flops, markdown_table,
                               measure_matmul_peak_flops, median_seconds)
from persona_jax import sampling
from persona_jax.hf import apply_chat_template, load_pretrained, resolve_source
from persona_jax.nn import quantization

# Chat questions of different lengths: batch-8 prompts are left-padded to the longest.
QUESTIONS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about autumn leaves falling in a quiet park.",
    "List three ways to keep a houseplant healthy.",
    "What is 17 times 23?",
    "Give me a recipe idea that uses tomatoes, basil and a little garlic.",
    "Who wrote Pride and Prejudice?",
    "Describe the water cycle for a ten year old, briefly and clearly.",
]


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="smollm2-135m-instruct",
                      help="short name, .gguf file or Hugging Face directory (both sides load it)")
  parser.add_argument("--reps", type=int, default=3, help="timed repetitions per figure (median)")
  parser.add_argument("--forward_batch", type=int, default=4)
  parser.add_argument("--forward_len", type=int, default=256)
  parser.add_argument("--generate_batches", default="1,8", help="comma-separated batch sizes")
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--matmul_size", type=int, default=2048, help="side of the peak-matmul operands")
  parser.add_argument("--weight_formats", default="float32,bfloat16,int8",
                      help="decode-weight formats to compare (persona_jax.nn.quantization)")
  parser.add_argument("--skip_forward", action="store_true", help="skip the forward comparison")
  return parser.parse_args()


@jax.jit
def _stream_read(leaves):
  """Reads every byte of `leaves` once (a sum, accumulated in fp32): the bandwidth-bound baseline."""
  return sum(jnp.sum(leaf, dtype=jnp.float32) for leaf in leaves)


def stream_read_seconds(decoder, reps: int) -> float:
  """Median seconds to read the decoder's weight arrays once (same arrays, same bytes)."""
  leaves = jax.tree.leaves(nnx.state(decoder, nnx.Param))
  return median_seconds(lambda: _stream_read(leaves).block_until_ready(), reps=max(reps, 3),
                        warmup=1)


def load_transformers_model(source: str):
  """transformers' model from the same source, fp32, eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  kind, path = resolve_source(source)
  if kind == "gguf":
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@functools.partial(jax.jit, static_argnames="graphdef")
def _jax_forward(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens).logits


def main():
  args = parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  transformers.utils.logging.disable_progress_bar()
  pretrained = load_pretrained(args.model)
  decoder, config = pretrained.decoder, pretrained.config
  hf_model = load_transformers_model(args.model)
  pad_id = config.pad_token_id if config.pad_token_id is not None else 0

  peak_jax = measure_matmul_peak_flops("jax", args.matmul_size)
  peak_torch = measure_matmul_peak_flops("torch", args.matmul_size)
  peak = max(peak_jax, peak_torch)

  rows = []

  def add_row(name, flops, ours_seconds, theirs_seconds, tokens):
    rows.append([
        name, f"{tokens / ours_seconds:,.1f}", f"{tokens / theirs_seconds:,.1f}",
        f"{theirs_seconds / ours_seconds:.2f}x", f"{flops / ours_seconds / peak:.1%}",
        f"{flops / theirs_seconds / peak:.1%}"])

  # Forward: logits at every position of a [batch, seq] block of random ids.
  forward_error = float("nan")
  if not args.skip_forward:
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.forward_batch, args.forward_len))
    graphdef, params = nnx.split(decoder)
    jax_ids, torch_ids = jnp.asarray(ids, jnp.int32), torch.as_tensor(ids)
    ours_logits = _jax_forward(graphdef, params, jax_ids)
    with torch.inference_mode():
      theirs_logits = hf_model(input_ids=torch_ids).logits.numpy()
      forward_error = float(np.abs(np.asarray(ours_logits) - theirs_logits).max())
      theirs_seconds = median_seconds(lambda: hf_model(input_ids=torch_ids).logits, reps=args.reps)
    ours_seconds = median_seconds(
        lambda: _jax_forward(graphdef, params, jax_ids).block_until_ready(), reps=args.reps)
    add_row(f"forward {args.forward_batch}x{args.forward_len} (tokens/s)",
            forward_flops(config, args.forward_batch, args.forward_len), ours_seconds,
            theirs_seconds, args.forward_batch * args.forward_len)

  # Decode weights: one converted copy per format (conversion timed separately), and the streaming
  # read of its weights (the bandwidth bound of a decode step).
  formats = [f for f in args.weight_formats.split(",") if f]
  if "float32" not in formats:
    formats.insert(0, "float32")  # the accuracy reference
  decoders, read_seconds, convert_seconds, sizes = {}, {}, {}, {}
  for weight_format in formats:
    start = time.perf_counter()
    decoders[weight_format] = jax.block_until_ready(
        quantization.convert_decoder_weights(decoder, weight_format))
    convert_seconds[weight_format] = time.perf_counter() - start
    read_seconds[weight_format] = stream_read_seconds(decoders[weight_format], args.reps)
    sizes[weight_format] = quantization.weight_bytes(decoders[weight_format])
  weight_rows = []

  # Greedy generation: chat prompts, exactly new_tokens per row on both sides.
  prompts_all = [
      pretrained.tokenizer.encode(apply_chat_template(
          pretrained.chat_template, [{"role": "user", "content": q}], True,
          **pretrained.special_tokens)).ids for q in QUESTIONS]
  agreement = {}
  for batch in [int(b) for b in args.generate_batches.split(",")]:
    prompts = [prompts_all[i % len(prompts_all)] for i in range(batch)]
    tokens, mask = sampling.pad_prompts(prompts, pad_id=pad_id)  # left-padded, no bucketing
    torch_tokens, torch_mask = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(mask).long()

    def ours_generate(model=decoder):
      return jax.block_until_ready(sampling.generate(
          model, (tokens, mask), max_new_tokens=args.new_tokens, stop_tokens=()).tokens)

    def theirs_generate():
      with torch.inference_mode():
        return hf_model.generate(torch_tokens, attention_mask=torch_mask, do_sample=False,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=pad_id)[:, tokens.shape[1]:]

    # transformers needs no warm-up (nothing to compile): its first timed call also gives its tokens.
    theirs_outputs = []
    theirs_seconds = median_seconds(lambda: theirs_outputs.append(theirs_generate()),
                                    reps=args.reps, warmup=0)
    ours_tokens = np.asarray(ours_generate())  # warm-up: compiles
    ours_seconds = median_seconds(ours_generate, reps=args.reps, warmup=0)
    # Greedy parity up to the first EOS (transformers' min_new_tokens forbids EOS before the end).
    theirs_tokens = theirs_outputs[0].numpy()
    same = 0
    for ours_row, theirs_row in zip(ours_tokens, theirs_tokens):
      eos_at = np.flatnonzero(ours_row == config.eos_token_id)
      end = int(eos_at[0]) if eos_at.size else args.new_tokens
      same += int(np.array_equal(ours_row[:end], theirs_row[:end]))
    agreement[batch] = f"{same}/{batch}"
    add_row(f"greedy generate batch {batch}, {args.new_tokens} new (tokens/s)",
            generation_flops(config, batch, tokens.shape[1], args.new_tokens), ours_seconds,
            theirs_seconds, batch * args.new_tokens)

    # The same generation from each decode-weight format.
    reference_logits = np.asarray(sampling.prefill(decoder, tokens, mask, tokens.shape[1]).logits)
    for weight_format in formats:
      model = decoders[weight_format]
      if weight_format == "float32":
        format_tokens, format_seconds = ours_tokens, ours_seconds
      else:
        format_tokens = np.asarray(ours_generate(model))  # warm-up: compiles
        format_seconds = median_seconds(lambda m=model: ours_generate(m), reps=args.reps, warmup=0)
      logits = np.asarray(sampling.prefill(model, tokens, mask, tokens.shape[1]).logits)
      agree = 0
      for reference_row, row in zip(ours_tokens, format_tokens):
        eos_at = np.flatnonzero(reference_row == config.eos_token_id)
        end = int(eos_at[0]) if eos_at.size else args.new_tokens
        agree += int(np.array_equal(reference_row[:end], row[:end]))
      # Each step reads every weight once: the bound is new_tokens weight reads (prefill aside).
      bound_seconds = args.new_tokens * read_seconds[weight_format]
      weight_rows.append([
          weight_format, f"{sizes[weight_format] / 2**20:,.0f}", batch,
          f"{batch * args.new_tokens / format_seconds:,.1f}",
          f"{theirs_seconds / format_seconds:.2f}x", f"{bound_seconds / format_seconds:.0%}",
          f"{agree}/{batch}", f"{np.abs(logits - reference_logits).max():.3f}"])

  print(f"\nmodel: {args.model} ({config.num_params() / 1e6:.0f}M parameters, fp32 both sides)")
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  print(f"matmul peak ({args.matmul_size}^3 fp32): jax {peak_jax / 1e9:.1f} GFLOP/s, "
        f"torch {peak_torch / 1e9:.1f} GFLOP/s; peak used below = {peak / 1e9:.1f} GFLOP/s")
  print(f"forward max abs logit difference vs transformers: {forward_error:.2e}")
  print("greedy rows identical to transformers (up to EOS): "
        + ", ".join(f"batch {b}: {a}" for b, a in agreement.items()))
  print(f"median of {args.reps} timed runs after warm-up; generation time includes the prefill\n")
  print(markdown_table(["measurement", "persona_jax", "transformers", "speed-up",
                        "persona_jax % of peak", "transformers % of peak"], rows))
  print("\ndecode weights (persona_jax.nn.quantization; transformers stays fp32); streaming read of "
        "each format's weights: " + ", ".join(
            f"{f} {sizes[f] / read_seconds[f] / 1e9:.1f} GB/s ({read_seconds[f] * 1e3:.1f} ms)"
            for f in formats))
  print("conversion time (once per set of weights): " + ", ".join(
      f"{f} {convert_seconds[f]:.2f} s" for f in formats if f != "float32"))
  print(f"logit difference: max |logits - fp32 logits| over the prompts' next-token logits "
        f"(fp32 logits span about {np.abs(reference_logits).max():.1f})\n")
  print(markdown_table(["weights", "MiB", "batch", "tokens/s", "vs transformers fp32",
                        "% of bandwidth bound", "greedy = fp32", "max |logit diff|"], weight_rows))


if __name__ == "__main__":
  main()
