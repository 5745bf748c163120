"""Training losses: logit distillation (kd.py)."""
