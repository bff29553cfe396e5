"""Hugging Face and GGUF interop: table-driven import and export of pretrained decoders.

  pretrained = load_pretrained("smollm2-135m-instruct")   # or an HF dir, a hub id, a .gguf file
  save_pretrained(pretrained.decoder, "out/", tokenizer=pretrained.tokenizer)
  save_peft_adapters(decoder_with_lora, "adapters/")       # one PEFT adapter per named LoRA adapter
"""

from persona_jax.hf.pretrained import (SHORT_NAMES, JobDecoder, Pretrained, load_job_decoder,
                                       load_pretrained, load_tokenizer, resolve_source,
                                       save_pretrained, tensor_names)
from persona_jax.hf.peft import adapter_dirs, load_peft_adapters, peft_model, save_peft_adapters
from persona_jax.hf.tokenizer import apply_chat_template

__all__ = ["SHORT_NAMES", "JobDecoder", "Pretrained", "adapter_dirs", "apply_chat_template",
           "load_job_decoder", "load_peft_adapters", "load_pretrained", "load_tokenizer", "peft_model",
           "resolve_source", "save_peft_adapters", "save_pretrained", "tensor_names"]
