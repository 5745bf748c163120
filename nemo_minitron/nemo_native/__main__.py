"""python -m nemo_minitron.nemo_native SCRIPT [--overrides FILE.yaml]... [hydra args...]"""
import sys

from nemo_minitron.errors import MinitronError
from nemo_minitron.nemo_native.launch import main

try:
    sys.exit(main())
except MinitronError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
