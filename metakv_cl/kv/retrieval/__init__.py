"""Retrieval memories: what a compacted cache throws away, kept in FAISS stores and retrieved.

* :mod:`~metakv_cl.kv.retrieval.datastore`: :class:`Datastore`, exact (flat) or approximate
  (IVF, HNSW) FAISS search with save/load;
* :mod:`~metakv_cl.kv.retrieval.knn_attention`: :class:`KNNMemoryCache`, a compacted cache
  whose evicted entries go to per-layer, per-KV-head stores that attention retrieves from
  (Memorizing Transformers);
* :mod:`~metakv_cl.kv.retrieval.knn_lm`: :class:`KNNLM`, next-token distributions mixed with
  those of the nearest stored contexts (kNN-LM), as a ``generate()`` logits processor and a
  perplexity scorer;
* :mod:`~metakv_cl.kv.retrieval.rag`: :class:`ChunkRetriever`, retrieval-augmented inputs
  (RAG) built from the LM's own chunk embeddings, and :class:`ExampleStore`, labelled examples
  retrieved by their prompt's embedding (in-context examples for classification).

FAISS is the optional extra ``retrieval`` (``pip install 'metakv-cl[retrieval]'``).
"""
