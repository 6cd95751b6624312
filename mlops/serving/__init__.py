"""Local serving: a batching engine per release, and an OpenAI-compatible gateway that routes between them."""
