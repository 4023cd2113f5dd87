"""USER image-text retrieval: encoders, enhancement, momentum model, feature extraction."""
