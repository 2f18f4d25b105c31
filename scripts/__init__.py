"""Command-line tools run from a checkout (not installed); importable as ``scripts.<name>`` for their tests."""
