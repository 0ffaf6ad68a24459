"""The ``nalar`` command."""
