"""``python -m streams``: the same command line as ``memstream``."""

from streams.surface.cli.main import main

if __name__ == "__main__":
    main()
