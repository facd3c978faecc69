"""Workflows above the engine: several runs, predictions and evaluations, and their reports (``medssm compare``,
``medssm quickstart``), each used as a user would use the commands."""
