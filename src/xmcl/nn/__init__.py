"""Network building blocks shared by both systems (image backbones, pooling, sequence encoders, heads).

:mod:`.sparse_conv`: sparse 3D convolutions (voxelisation, hashed coordinates, kernel maps, sparse layers).
"""
