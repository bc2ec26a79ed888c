"""The ``memstream`` command line: main (the parser and most commands), reads, replay, keys."""
