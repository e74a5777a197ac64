"""Importing this package registers every dataset loader in ``bench.data.spec.DATASETS``."""
from bench.data.loaders import (  # noqa: F401  (imported for registration)
    chexpert,
    covidx,
    iu_xray,
    mimic_cxr,
    nih,
    object_cxr,
    rsna,
    siim,
)
