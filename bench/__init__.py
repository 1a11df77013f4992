"""Side-by-side benchmark: ftsearch vs transformers' Trainer.hyperparameter_search vs a bare loop.

Run by hand (``python -m bench.run --help``); see bench/README.md. Nothing here is imported by
ftsearch itself.
"""
