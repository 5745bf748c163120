"""The jobs users launch (prune, finetune, distill, generate): each module parses its own arguments
(``main(argv)``) and runs the same way under ``python``, ``torchrun`` and ``srun``. The ``recipes/``
directory of a checkout holds thin entry points for ``torchrun recipes/NAME.py``; ``nemo-minitron
NAME`` and ``python -m nemo_minitron.recipes.NAME`` run the same code from an installed wheel."""
