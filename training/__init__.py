"""Turning corrections into better adapters: datasets, QLoRA training, evaluation, the gate,
the adapter registry, and (later) the Celery tasks that run it on a schedule."""
