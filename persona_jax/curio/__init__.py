"""CURIO: curiosity-rewarded multi-turn RL on simulated users (Wan et al., arXiv 2504.03206).

envs.py (domains, simulated users, the dialogue), tasks.py (vocabulary, encodings, scripted
dialogues, metrics), rewards.py (intrinsic and extrinsic rewards), model.py (user model, policy),
train.py (the three-stage job), eval.py (playing dialogues, held-out evaluation).
"""
