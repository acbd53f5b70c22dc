"""cliptime: train, tune and register time-aware multimodal models (CLIPTime, T-CLAP) on Ray with MLflow."""

__version__ = "0.1.0"
