"""SeqIO data for persona_jax: vocabularies, language-modelling tasks, deterministic resumable batches.

Typical use:

  vocabulary = get_vocabulary("smollm2-135m-instruct")          # or "bytes", a tokenizer.json
  task = lm_task("tiny_shakespeare", vocabulary)                # registers once, returns the name
  batches = make_iterator(task, split="train", sequence_length=256, batch_size=8, seed=0)
  batch = next(batches)          # {decoder_input_tokens, ..., decoder_positions}: int32 [8, 256]
  state = batches.get_state()    # JSON dict; later: DataIterator.from_state(state) or set_state
"""

from persona_jax.data.pipeline import BATCH_FEATURES
from persona_jax.data.pipeline import build_dataset
from persona_jax.data.pipeline import DataConfig
from persona_jax.data.pipeline import DataIterator
from persona_jax.data.pipeline import make_iterator
from persona_jax.data.tasks import DEFAULT_LINES_PER_DOCUMENT
from persona_jax.data.tasks import ensure_tfds_prepared
from persona_jax.data.tasks import lm_task
from persona_jax.data.tasks import register_in_memory_task
from persona_jax.data.tasks import register_text_file_task
from persona_jax.data.tasks import register_tfds_text_task
from persona_jax.data.tasks import split_into_documents
from persona_jax.data.tasks import TFDS_TEXT_DATASETS
from persona_jax.data.tasks import TfdsTextDataset
from persona_jax.data.vocabularies import get_vocabulary
from persona_jax.data.vocabularies import HFTokenizerVocabulary
from persona_jax.data.vocabularies import vocabulary_name
from persona_jax.data import user_histories

__all__ = [
    "BATCH_FEATURES", "build_dataset", "DataConfig", "DataIterator", "make_iterator",
    "DEFAULT_LINES_PER_DOCUMENT", "ensure_tfds_prepared", "lm_task", "register_in_memory_task", "register_text_file_task",
    "register_tfds_text_task", "split_into_documents", "TFDS_TEXT_DATASETS", "TfdsTextDataset",
    "get_vocabulary", "HFTokenizerVocabulary", "vocabulary_name", "user_histories",
]
