"""Subcommands of `samebox`, one module each; builder/cli.py registers every module found here."""
