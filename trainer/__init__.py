"""Fine-tuning of contrastive encoders: config, data, losses, mining, evaluation, export."""
