"""Entry point of ``nemo_minitron.recipes.generate``, for ``torchrun recipes/generate.py ...`` and ``srun python
recipes/generate.py ...`` from a checkout (same arguments as ``nemo-minitron generate``)."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nemo_minitron.recipes.generate import main

    sys.exit(main())
