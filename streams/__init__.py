"""Composition root: the faust worker, thin agents, the CLI and the Python API."""
