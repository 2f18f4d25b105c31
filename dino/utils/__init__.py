"""Training utilities: per-iteration schedules and optimiser parameter groups."""
