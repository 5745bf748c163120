"""``import nemo_minitron.nemo_native.autopatch`` in your own NeMo launcher, before the model is
built: installs the patches the installed NeMo version needs (none from NeMo 2.0.0 on)."""
from nemo_minitron.nemo_native.patches import apply

APPLIED = apply()
