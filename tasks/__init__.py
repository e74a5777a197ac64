"""Importing this package registers every task in ``bench.api.TASKS`` (explicit list)."""
from tasks import (  # noqa: F401  (imported for registration)
    classification,
    detection,
    segmentation,
)
