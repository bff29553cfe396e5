"""Scores a fixed set of eval rows with a tiny coprocessor, as one of N processes or alone.

Usage: eval_script.py NUM_PROCESSES PROCESS_ID PORT OUT_JSON
Each process scores its own contiguous block of the 8 rows (as a sharded eval iterator would hand
them out); `evaluate_perplexity` reduces the sums across processes, so every process's table must
equal the single-process table over all 8 rows.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
num_processes, process_id, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if num_processes > 1:
  os.environ.update(PERSONA_JAX_COORDINATOR=f"127.0.0.1:{port}",
                    PERSONA_JAX_NUM_PROCESSES=str(num_processes), PERSONA_JAX_PROCESS_ID=str(process_id))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from persona_jax.coprocessor import eval as eval_lib  # noqa: E402
from persona_jax.coprocessor.model import CacheCoprocessor  # noqa: E402
from persona_jax.nn import build_decoder, get_config  # noqa: E402
from persona_jax.train import maybe_initialize_distributed  # noqa: E402

assert maybe_initialize_distributed() == (num_processes > 1)
assert jax.process_count() == num_processes

ROWS, LENGTH = 8, 32
rng = np.random.default_rng(0)
tokens = rng.integers(3, 259, size=(ROWS, LENGTH)).astype(np.int32)
segments = np.ones((ROWS, LENGTH), np.int32)
segments[::2, LENGTH // 2:] = 2  # every other row packs two documents
positions = np.where(segments == 1, np.arange(LENGTH), np.arange(LENGTH) - LENGTH // 2).astype(np.int32)
batch = {"decoder_target_tokens": tokens, "decoder_segment_ids": segments,
         "decoder_positions": positions}

model = CacheCoprocessor(build_decoder(get_config("tiny_llama", vocab_size=259), 0), num_latents=2,
                         variant="full", seed=0)
rows = ROWS // num_processes
start = jax.process_index() * rows
shard = {name: value[start:start + rows] for name, value in batch.items()}
results = eval_lib.evaluate_perplexity(model, [shard], num_traces=3, ahead_tokens=4)
with open(out_path, "w") as f:
  json.dump(results, f)
