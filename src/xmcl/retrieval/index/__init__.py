"""A searchable collection: image files (and captions) encoded by a trained model, their metadata in SQLite,
their embeddings in float16 shards, and FAISS indexes over them.

``collection`` finds the files and reads caption files; ``store`` is the metadata store; ``shards`` the embedding
shards; ``vectors`` chooses, tunes and builds the FAISS index; ``build`` runs an indexing pass (resumable,
incremental, data-parallel under torchrun); ``search`` opens a built index and answers queries.
"""
