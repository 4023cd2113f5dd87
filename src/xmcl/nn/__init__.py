"""Network building blocks shared by both systems (image backbones, pooling, sequence encoders, heads)."""
