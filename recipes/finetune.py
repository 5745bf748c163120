"""Entry point of ``nemo_minitron.recipes.finetune``, for ``torchrun recipes/finetune.py ...`` and ``srun python
recipes/finetune.py ...`` from a checkout (same arguments as ``nemo-minitron finetune``)."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nemo_minitron.recipes.finetune import main

    sys.exit(main())
