"""Launching jobs on clusters: sbatch scripts (slurm.py) and the convert -> prune -> distill ->
export chain of dependent jobs (pipeline.py). Ranks inside a job come from nemo_minitron.dist."""
