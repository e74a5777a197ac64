"""Shared parts of the vision-language pretraining methods (ConVIRT, GLoRIA, MGCA, ...)."""
