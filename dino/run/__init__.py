"""Launch training on SLURM (or locally) through submitit: ``python -m dino.run.train``."""
