"""Data: generators (shapes world), readers of the real formats, tokenisers and image preprocessing."""
