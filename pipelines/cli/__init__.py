"""The `capfilt` command line: the parser, and the subcommands of the stages."""
