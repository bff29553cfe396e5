"""MiLP: per-user memory as LoRA modules injected into a frozen decoder, layout found by Bayesian search.

model.py (MemoryLayout, inject_memory), tasks.py (users, SeqIO tasks, ROUGE-L / Persona-F1),
train.py (the job: baselines, Optuna GP search, per-user PEFT export), eval.py (generation, scoring).
"""
