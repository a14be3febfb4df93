"""Text at the token boundary: the tokenizer, the incremental detokenizer and its stop matcher."""
