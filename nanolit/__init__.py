"""nanolit: nanochat's pre-training and mid-training recipe (commit d575940) as a PyTorch Lightning package.

Plain-torch layers: ``nanolit.model``, ``optim``, ``schedules``, ``tokenizer``, ``checkpoint``, ``engine``,
``eval``. Lightning layers: ``nanolit.module``, ``midtrain``, ``data`` (DataModules), ``nanolit.callbacks``, and
the ``nanolit`` command (``nanolit.cli``).
"""

__version__ = "0.1.0"
