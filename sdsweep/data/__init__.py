"""Captioned images: folders, Hugging Face datasets, the built-in set, the training dataset and
its samplers, and the feature cache shared by a sweep."""
