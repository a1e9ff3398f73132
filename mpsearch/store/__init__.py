"""Bytes on disk: the content-addressed cache and the Optuna study storages."""
