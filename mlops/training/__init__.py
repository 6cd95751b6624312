"""The default recipe: a char-level tokenizer and a GPT-2-style model from scratch, or a fine-tune."""
