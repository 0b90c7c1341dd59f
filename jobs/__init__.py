"""Fine-tuning jobs: records, the store and queue (SQLite embedded or Redis), and workers."""
