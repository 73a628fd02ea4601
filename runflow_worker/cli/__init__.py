"""The ``runflow-worker`` command: one module per subcommand."""
