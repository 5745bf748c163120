"""Entry point of the processes PyTorch Lightning relaunches from ``nemo-minitron nemo SCRIPT``
(ranks 1.. of a multi-GPU ``python`` launch): they re-run sys.argv, whose first item is this file.
Not for direct use."""
import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run as a file: keep this package's modules from shadowing top-level ones

from nemo_minitron.errors import MinitronError  # noqa: E402
from nemo_minitron.nemo_native.launch import relaunched  # noqa: E402

if __name__ == "__main__":
    try:
        sys.exit(relaunched())
    except MinitronError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
