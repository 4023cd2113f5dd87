"""USER image-text retrieval as a library: what inference needs, the training task, and the files around a model.

:mod:`.config`: the typed config of a retrieval run (model, loss, data, optimiser).
:mod:`.encoders`: the two towers (local features -> SGE -> joint space -> pooling -> unit embedding).
:mod:`.enhancement`: self-guided enhancement (SGE) of local features.
:mod:`.cge`: CLIP-guided enhancement (CGE).
:mod:`.dual_encoder`: ``DualEncoder``, the encoders apart from training (what inference builds).
:mod:`.model`: the training task: key encoders, queues, the loss and the momentum step.
:mod:`.grid_features`: ``xmcl features``: a frozen backbone's grid features and their manifest.
:mod:`.token_features`: a frozen text model's token states, cached once (locked text).
:mod:`.inference`: checkpoint or model directory -> encoders -> embeddings -> metrics (``xmcl evaluate``).
:mod:`.model_dir`: the model directory layout and its verified reading.
:mod:`.export`: ``xmcl export``: a checkpoint -> a model directory with its card.
:mod:`.onnx_export`: the encoders as ONNX graphs (``xmcl export --onnx``).
:mod:`.onnx_runtime`: a model directory's encoders under ONNX Runtime.
:mod:`.retriever`: ``Retriever``: raw images and captions -> unit embeddings, per runtime.
:mod:`.clip`: CLIP for CGE (tokenizer, preprocessing, teacher, cache, the small CLIP).
:mod:`.index`: a searchable collection (files, SQLite store, float16 shards, FAISS, indexing, ``Searcher``).
"""
