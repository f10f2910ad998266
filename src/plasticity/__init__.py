"""plasticity: representation plasticity along a fine-tuning timeline.

The core library. It imports without Prefect, Ray or s3fs; the orchestration lives in
the `tasks` and `flows` packages beside it.
"""

__version__ = "0.1.0"
