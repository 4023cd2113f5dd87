"""CLIP for CGE: the tokenizer, image preprocessing, OpenAI key conversion, the frozen teacher, the embedding
cache, and the small CLIP that ``xmcl train-clip`` trains. Import from the modules."""
