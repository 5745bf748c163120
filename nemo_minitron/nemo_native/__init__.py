"""NeMo-native path: run NeMo's own scripts on Llama-3.1-Minitron with what NeMo 24.05 lacks.

    nemo-minitron nemo megatron_gpt_eval.py \
        --overrides megatron_gpt_eval_minitron_4b_width gpt_model_file=m.nemo
    python -m nemo_minitron.nemo_native megatron_gpt_eval.py gpt_model_file=m.nemo
    import nemo_minitron.nemo_native.autopatch  # before NeMo builds a model, in your own launcher

See docs/nemo_native.md for which NeMo version needs which patch.
"""
__all__ = ["NemoNotInstalledError", "NemoPatchError", "apply", "dense_lora_in_features",
           "installed_nemo_version", "needed_patches", "remove", "rope_scaling_for"]

from nemo_minitron.nemo_native.patches import (  # noqa: F401,E402
    NemoPatchError, apply, dense_lora_in_features, remove, rope_scaling_for)
from nemo_minitron.nemo_native.versions import (  # noqa: F401,E402
    NemoNotInstalledError, installed_nemo_version, needed_patches)
