"""Parts every task family shares: settings, seeds, inputs, augmentation, feature cache, precision,
schedules, split rows, heads and evaluation. Import from the named module (``tasks.common.inputs``
...); nothing is re-exported here, so each name has one home."""
