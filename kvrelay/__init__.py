"""kvrelay: a Ray-distributed, multi-GPU LLM serving worker pool.

The importable package is ``kvrelay``; its subpackages live at the repository's top level
(``worker/``, ``cluster/``, ``memory_model/``, ``proto/``) and are linked in here, so
``kvrelay.worker`` is ``worker/`` in a checkout and in an installed wheel alike.
"""

__version__ = "0.1.0"
