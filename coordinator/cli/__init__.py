"""The `edgeshard` command line: one table of subcommands (main.py), one module per group of commands."""
