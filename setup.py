"""persona_jax: personalizing large language models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="persona_jax",
    version="0.1.0",
    description="JAX/Flax research codebase for personalizing LLMs: cache coprocessor, User-LLM, "
                "RLPF, CURIO, MiLP on a shared frozen decoder.",
    packages=find_packages(include=["persona_jax", "persona_jax.*"]),
    # The gin configs ship inside the package (the repository's gin/ is a link to persona_jax/gin), so
    # `--gin_file=gin/coprocessor.gin` works from an installed wheel too.
    package_data={"persona_jax": ["gin/*.gin", "gin/models/*.gin"]},
    license="Apache-2.0",
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "seqio>=0.0.19",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # TFDS needs it when it prepares a data set
        "gin-config>=0.5",
        "absl-py",
        "numpy",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "tensorboardX>=2.6",  # TensorBoard events when the `tensorboard` package is absent
        "clu>=0.0.12",  # metric writers (persona_jax.train.metrics)
        "tensorboard>=2.16",  # clu.metric_writers imports it (TensorFlow no longer pulls it in)
        "tensorflow>=2.16",  # tf.data pipelines (persona_jax.data) and TF summaries
        "etils[epath]",  # local and gs:// workdirs
        "jinja2>=3.1",  # chat templates (persona_jax.hf.apply_chat_template)
        "rouge-score>=0.1.2",  # ROUGE-L / ROUGE-Lsum metrics (User-LLM, MiLP)
        "optuna>=3.6",  # MiLP's Bayesian layout search (GP sampler)
        "qwix>=0.1.8",  # int8 weight-only decoding (persona_jax.nn.quantization)
        "bm25s>=0.3.16",  # MiLP's BM25 retrieval baseline (numpy only)
    ],
    extras_require={
        # Parity and round-trip tests compare against the PyTorch reference implementations.
        "test": ["pytest>=8", "transformers>=4.46", "torch>=2.4", "peft>=0.13", "accelerate>=0.34",
                 "gguf>=0.10", "nbclient", "nbformat", "ipykernel", "matplotlib", "tensorboard>=2.16",
                 "wandb>=0.19.10", "lm-eval>=0.4.8,<0.5"],
        "gguf": ["gguf>=0.10"],
        # The TensorBoard viewer; with it installed, events are written through clu's TF SummaryWriter
        # (hparams tab included) instead of tensorboardX.
        "tensorboard": ["tensorboard>=2.16"],
        # TrainConfig.metrics_writers = ('tensorboard', 'wandb').
        "wandb": ["wandb>=0.19.10"],
        # persona_jax.evaluation.lm_eval_adapter: the decoder as an lm-evaluation-harness model.
        "lm_eval": ["lm-eval>=0.4.8,<0.5"],
        # Optuna's GPSampler (MiLP's layout search) imports torch and scipy at run time.
        "milp": ["torch>=2.4", "scipy"],
        "tpu": ["jax[tpu]", "google-cloud-storage"],  # gs:// workdirs: TensorBoard events via tensorboardX
        "cuda": ["jax[cuda12]"],
    },
    entry_points={
        # `persona-jax --gin_file=... --workdir=...` is `python -m persona_jax.main ...`.
        "console_scripts": ["persona-jax = persona_jax.main:entry_point"],
    },
)
