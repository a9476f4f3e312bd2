"""Planning a fine-tune before running it: which method fits and what it will cost."""
