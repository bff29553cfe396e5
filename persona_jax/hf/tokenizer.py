"""Tokenizers and chat templates: from a Hugging Face directory or from GGUF metadata.

The tokenizer is a plain `tokenizers.Tokenizer` (no `transformers` needed at run time). A GGUF file
carries a byte-level BPE vocabulary, its merges and token types; `tokenizer_from_gguf_metadata`
rebuilds the same tokenizer with the `tokenizers` library, choosing the pre-tokenizer the file names
(`tokenizer.ggml.pre`) the way llama.cpp does.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from persona_jax.errors import UserError

# llama.cpp token types (gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool = True):
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


# `tokenizer.ggml.pre` -> the pre-tokenizer of the model's original tokenizer.json. SmolLM's splits
# every digit on its own before GPT-2's byte-level regex (llama.cpp: `\p{N}` then the GPT-2 regex).
GGUF_PRE_TOKENIZERS = {
    "gpt2": lambda: _byte_level(),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), _byte_level(use_regex=False)]),
}
GGUF_PRE_TOKENIZERS["llama3"] = GGUF_PRE_TOKENIZERS["llama-bpe"]


def tokenizer_from_gguf_metadata(metadata: dict[str, Any], where: str) -> Tokenizer:
  """A byte-level BPE `Tokenizer` from GGUF `tokenizer.ggml.*` metadata.

  Args:
    metadata: GGUF key -> value (`tokens`, `merges`, `token_type` as Python lists).
    where: the file, for error messages.
  """
  model = metadata.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise UserError(f"{where}: tokenizer.ggml.model={model!r} is not supported; only byte-level BPE "
                     "('gpt2', as SmolLM2 and Llama 3 use) can be rebuilt from GGUF metadata.")
  pre = metadata.get("tokenizer.ggml.pre", "gpt2")
  if pre not in GGUF_PRE_TOKENIZERS:
    raise UserError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                     f"{sorted(GGUF_PRE_TOKENIZERS)}. Load the model's tokenizer.json instead.")
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
    if key not in metadata:
      raise UserError(f"{where}: GGUF metadata lacks {key!r}; the tokenizer cannot be rebuilt.")
  tokens = list(metadata["tokenizer.ggml.tokens"])
  vocab = {token: index for index, token in enumerate(tokens)}
  merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
  unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                   unk_token=tokens[unk_id] if unk_id is not None else None))
  tokenizer.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
  tokenizer.decoder = decoders.ByteLevel()
  token_types = list(metadata.get("tokenizer.ggml.token_type") or [])
  # Control tokens (<|im_start|>, <|endoftext|>) must stay whole and be skippable on decode.
  tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, token_types) if kind == _CONTROL])
  tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                        for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED])
  bos_id = metadata.get("tokenizer.ggml.bos_token_id")
  if metadata.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
    bos = tokens[bos_id]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
  else:
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  return tokenizer


def special_tokens_from_gguf_metadata(metadata: dict[str, Any]) -> dict[str, str]:
  """{'bos_token': ..., 'eos_token': ..., 'unk_token': ..., 'pad_token': ...} named by the GGUF ids."""
  tokens = metadata.get("tokenizer.ggml.tokens") or []
  names = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
           "pad_token": "padding_token_id"}
  special = {}
  for name, key in names.items():
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    if token_id is not None and 0 <= token_id < len(tokens):
      special[name] = tokens[token_id]
  return special


def _token_text(value) -> str | None:
  """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def read_tokenizer_dir(directory: pathlib.Path) -> tuple[Tokenizer | None, str | None, dict[str, str]]:
  """(tokenizer, chat template, special tokens) from a Hugging Face model directory.

  The tokenizer comes from tokenizer.json (None when absent). The chat template comes from
  chat_template.jinja (transformers >= 4.47 writes it there) or tokenizer_config.json.
  """
  tokenizer = None
  tokenizer_file = directory / "tokenizer.json"
  if tokenizer_file.is_file():
    try:
      tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # tokenizers raises a bare Exception on malformed JSON
      raise UserError(f"{tokenizer_file}: not a valid tokenizers JSON file ({error}); "
                       "re-save it with `tokenizer.save(path)`.") from None
  config: dict[str, Any] = {}
  config_file = directory / "tokenizer_config.json"
  if config_file.is_file():
    try:
      config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
      raise UserError(f"{config_file}: invalid JSON ({error}).") from None
  template = config.get("chat_template")
  jinja_file = directory / "chat_template.jinja"
  if jinja_file.is_file():
    template = jinja_file.read_text()
  if isinstance(template, list):  # several named templates: use the default one
    named = {entry["name"]: entry["template"] for entry in template}
    template = named.get("default")
  special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "unk_token",
                                                                "pad_token")}
  return tokenizer, template, {name: text for name, text in special.items() if text is not None}


def write_tokenizer_dir(directory: pathlib.Path, tokenizer: Tokenizer | None, chat_template: str | None,
                        special_tokens: dict[str, str] | None = None, model_max_length: int | None = None):
  """tokenizer.json + tokenizer_config.json that `transformers.AutoTokenizer` loads."""
  config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
  if tokenizer is not None:
    tokenizer.save(str(directory / "tokenizer.json"))
  config.update(special_tokens or {})
  if chat_template is not None:
    config["chat_template"] = chat_template
  if model_max_length is not None:
    config["model_max_length"] = model_max_length
  (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def apply_chat_template(chat_template: str, messages: Sequence[dict[str, Any]],
                        add_generation_prompt: bool = True, *, bos_token: str = "", eos_token: str = "",
                        **template_kwargs) -> str:
  """Renders a Jinja chat template the way `transformers`' `apply_chat_template(tokenize=False)` does.

  Same environment (sandboxed, `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`,
  `strftime_now`, a `tojson` that keeps unicode) and the same variables: `messages`,
  `add_generation_prompt`, the special tokens, plus any `template_kwargs` (e.g. `tools`).
  """
  import jinja2  # pylint: disable=g-import-not-at-top
  import jinja2.ext  # pylint: disable=g-import-not-at-top  (loopcontrols; not loaded by `import jinja2`)
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  if not chat_template:
    raise UserError("apply_chat_template: no chat template; this model's tokenizer files carry none.")

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  template = env.from_string(chat_template)
  return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                         bos_token=bos_token, eos_token=eos_token, **template_kwargs)
