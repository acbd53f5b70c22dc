"""Model building blocks: offline-safe loaders for open_clip and laion_clap backbones, and prediction heads."""
