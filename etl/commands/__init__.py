"""Subcommands of the lamost-vac CLI, one module per group."""
