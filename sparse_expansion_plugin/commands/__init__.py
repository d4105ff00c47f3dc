"""Sub-commands of ``sparse-expansion``; each module has ``add_arguments`` and ``run``."""
