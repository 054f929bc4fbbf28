"""Model and tokenizer factory, generation backends."""
