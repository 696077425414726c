"""Benchmarks of dit_fast: one script per question (`python bench/<name>.py` or `python -m bench.<name>`)."""
