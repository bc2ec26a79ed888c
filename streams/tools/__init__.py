"""Bench, chaos and demo: they drive the runtime through the surface's operations."""
