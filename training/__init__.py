"""Turning corrections into better adapters: datasets, QLoRA training, evaluation, the gate,
the adapter registry, and the Celery tasks and beat schedule that run it."""
