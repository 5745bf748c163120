class DelayedScaling:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("transformer_engine stand-in: fp8 recipes need the real Transformer Engine")


class Format:
    E4M3 = "E4M3"
    HYBRID = "HYBRID"
