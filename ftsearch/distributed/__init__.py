"""Running one study's trials in several processes or machines: the shared Optuna storage with
heartbeats (``storage``), the worker loop that claims trial slots (``worker``) and the local
worker processes of ``ftsearch search --workers N`` (``parallel``)."""
