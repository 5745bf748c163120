"""Entry point of ``nemo_minitron.recipes.distill``, for ``torchrun recipes/distill.py ...`` and ``srun python
recipes/distill.py ...`` from a checkout (same arguments as ``nemo-minitron distill``)."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nemo_minitron.recipes.distill import main

    sys.exit(main())
