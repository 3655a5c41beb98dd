"""Data: image preprocessing, dataset readers, augmentation and batching (numpy, no model)."""
