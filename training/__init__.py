"""Turning corrections into better adapters: the datasets (SFT rows and preference pairs), QLoRA
SFT training and preference (DPO) training, evaluation and the gate with its forgetting guard, one
run start to finish, the adapter registry, shadow drafting, combined adapters, exports of a
version, and the Celery tasks and beat schedule that run it."""
