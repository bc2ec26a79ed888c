"""What people use: the Python API, the HTTP API and its contract, the shared operations, console output and the CLI.

May import streams.runtime.stores; reaches streams.tools only lazily, inside the CLI commands that launch them."""
