"""Importing this package registers every method in ``bench.api.METHODS`` (explicit list)."""
from methods import (  # noqa: F401  (imported for registration)
    convirt,
    gloria,
    imagenet,
    mgca,
    pixels,
    place,
    random_init,
    reclf,
    sista,
    supervised,
)
