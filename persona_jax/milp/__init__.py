"""MiLP: per-user memory as LoRA modules injected into a frozen decoder, layout found by Bayesian search.

model.py (MemoryLayout, inject_memory, SearchSpace), tasks.py (users, SeqIO tasks, ROUGE-L /
Persona-F1), job.py (the method: baselines, Optuna GP search, per-user PEFT memories), eval.py
(generation, scoring, tables).
"""
