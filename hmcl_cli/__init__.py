"""hmcl: adapt text-embedding models to a task with Hierarchical Multilevel Contrastive Learning."""

__version__ = "0.1.0"
