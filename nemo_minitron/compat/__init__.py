"""Compatibility: Megatron-Core version differences (mcore.py) and the CPU shim (cpu.py)."""


def quiet_fallback_warnings() -> None:
    """Silence megatron-core's import-time notices that apex / Transformer Engine are absent (it
    falls back to torch implementations, which is what a CPU run wants) and the deprecation of
    defaults we do not set. Real warnings stay visible."""
    import warnings

    for pattern in (r".*(Apex|apex|Transformer Engine|TE) (is |are )?not installed.*",
                    r"full scope is deprecated.*", r".*custom_layers\.transformer_engine.*",
                    r"`load_state_dict` is deprecated.*", r"Please use DTensor instead.*"):
        warnings.filterwarnings("ignore", message=pattern)
