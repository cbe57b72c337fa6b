"""Datasets (TFDS builders) and the input pipeline that turns them into batches."""
