"""CURIO: curiosity-rewarded multi-turn RL on simulated users (Wan et al., arXiv 2504.03206).

envs.py (domains, simulated users, the dialogue), tasks.py (vocabulary, encodings, scripted
dialogues, array batches, metrics), rewards.py (intrinsic and extrinsic rewards), model.py (user
model, policy, imitation loss), job.py (the method: three stages, the RL stage on `rl.Learner` with
`DialogueRollouts`), eval.py (playing dialogues, held-out evaluation, the table).
"""
