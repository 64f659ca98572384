"""The training loop (budgets, schedule, validation, early stopping) and its resumable checkpoints."""
