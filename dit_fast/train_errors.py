"""The errors dit_fast.train reports: bad command-line input, and training that cannot go on."""


class UsageError(ValueError):
    """Bad command-line input; main() reports it like argparse does."""


class TrainingError(RuntimeError):
    """Training cannot go on (out of memory); the message says what to change."""
