"""ftsearch: automated model and hyperparameter selection for fine-tuning pretrained backbones."""

__version__ = "0.1.0"
