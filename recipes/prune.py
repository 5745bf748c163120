"""Entry point of ``nemo_minitron.recipes.prune``, for ``torchrun recipes/prune.py ...`` and ``srun python
recipes/prune.py ...`` from a checkout (same arguments as ``nemo-minitron prune``)."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nemo_minitron.recipes.prune import main

    sys.exit(main())
