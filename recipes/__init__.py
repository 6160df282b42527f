"""The recipes as a package: ``from recipes.vit_cifar import run``, no sys.path edits.

The scripts still run as files (``accelerate launch recipes/vit_cifar.py ...``) from a source checkout: the
project's editable install (``make install``; ``pip install -e .``) puts the checkout root on ``sys.path``, so
``recipes``, ``hf_ens`` and ``trainers`` import alike; without it, run with ``PYTHONPATH=.``.
"""
