"""Retrieval-augmented inputs: chunk documents, embed the chunks, retrieve the nearest and prepend them.

Lewis et al., "Retrieval-Augmented Generation for Knowledge-Intensive NLP Tasks" (NeurIPS
2020), in the in-context form of Ram et al., "In-Context Retrieval-Augmented Language Models"
(TACL 2023): the LM is left as it is and reads the retrieved chunks before its input. Chunks are
embedded by the LM's own mean-pooled final hidden states (unit length, searched by inner
product, so by cosine similarity), or by any ``embed`` function passed in (a sentence-transformers
model's ``encode``, for instance).

:func:`rag_log_likelihood` is the long-context evaluation mode: a long text is scored stride by
stride, each stride read after the chunks of the text before it that best match the latest
tokens, plus those latest tokens themselves, so the model attends to a fixed number of tokens, as
a compacted cache of that size would hold.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from metakv_cl.kv.retrieval.datastore import Datastore
from metakv_cl.kv.retrieval.knn_lm import FinalHiddenStates


def chunk_tokens(ids: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Split 1-D token ids into consecutive chunks of ``chunk_size`` tokens (the last may be shorter).

    Raises:
        ValueError: ids that are not 1-D, or a chunk size below 1.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D token ids, got shape {tuple(ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return list(ids.split(chunk_size))


class MeanPooledEmbedder:
    """Embeds token sequences as the unit-length mean of a causal LM's final hidden states.

    Args:
        model: a causal LM (its output layer's input is pooled).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, sequences: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embeddings [len(sequences), hidden] (float32) of 1-D token sequences (any lengths)."""
        device = self.model.device
        lengths = torch.tensor([len(s) for s in sequences], device=device)
        padded = torch.nn.utils.rnn.pad_sequence([s.to(device) for s in sequences], batch_first=True)
        mask = (torch.arange(padded.shape[1], device=device) < lengths[:, None]).long()  # right padding
        with FinalHiddenStates(self.model) as captured:
            self.model(input_ids=padded, attention_mask=mask, use_cache=False)
        hidden = captured.latest.float() * mask[..., None]
        pooled = hidden.sum(dim=1) / lengths[:, None]
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()


class ChunkRetriever:
    """A chunk store for retrieval-augmented inputs (see the module docstring).

    Args:
        embed: maps a list of 1-D token tensors to [n, dim] embeddings (for instance a
            :class:`MeanPooledEmbedder`); compared by inner product.
        chunk_size: tokens per chunk.
        top_k: chunks retrieved per input.
        index: datastore index kind (``flat`` or ``hnsw``).
        seed: datastore seed.

    Raises:
        ValueError: a chunk size or top_k below 1.
    """

    def __init__(self, embed: Callable[[Sequence[torch.Tensor]], torch.Tensor], *, chunk_size: int = 64, top_k: int = 4,
                 index: str = "flat", seed: int = 0):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        self.embed, self.chunk_size, self.top_k = embed, chunk_size, top_k
        self.index_kind, self.seed = index, seed
        self.datastore: Datastore | None = None
        self.chunks: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored chunk tokens (int64) and their embeddings (float32)."""
        return sum(chunk.nbytes for chunk in self.chunks) + (0 if self.datastore is None else self.datastore.nbytes)

    def add_chunks(self, chunks: Sequence[torch.Tensor]) -> None:
        """Embed and store chunks of 1-D token ids."""
        if not chunks:
            return
        embeddings = self.embed(list(chunks))
        if self.datastore is None:
            self.datastore = Datastore(embeddings.shape[-1], metric="ip", index=self.index_kind, seed=self.seed)
        self.datastore.add(embeddings)
        self.chunks.extend(chunk.cpu() for chunk in chunks)

    def add_documents(self, documents: Iterable[torch.Tensor]) -> None:
        """Chunk 1-D token-id documents and store every chunk."""
        for document in documents:
            self.add_chunks(chunk_tokens(document.reshape(-1), self.chunk_size))

    def retrieve(self, query: torch.Tensor, k: int | None = None) -> list[torch.Tensor]:
        """The ``k`` (default ``top_k``) stored chunks nearest to the 1-D token ids ``query``, nearest first.

        Raises:
            ValueError: an empty store.
        """
        if self.datastore is None:
            raise ValueError("cannot retrieve from an empty ChunkRetriever: add documents first")
        ids = self.datastore.search(self.embed([query.reshape(-1)]), k or self.top_k).ids[0]
        return [self.chunks[i] for i in ids.tolist()]

    def augment(self, input_ids: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """``input_ids`` (1-D) preceded by its retrieved chunks, the nearest one last (next to the input)."""
        input_ids = input_ids.reshape(-1)
        retrieved = self.retrieve(input_ids, k)
        return torch.cat([*reversed(retrieved), input_ids.cpu()]).to(input_ids.device)


class ExampleStore:
    """Examples (1-D token ids) searched by the embedding of their prompt, their first tokens.

    The key of an example is its prompt's embedding, so a query (a prompt without its answer)
    finds the examples whose prompts resemble it, whatever their answers. The token ids are kept
    beside the keys, so every key can be recomputed by another embedder (:meth:`reembed`).

    Args:
        dim: embedding dimension.
        index: datastore index kind (``flat``, ``ivf`` or ``hnsw``), searched by inner product.
        seed: datastore seed.

    Raises:
        ValueError: see :class:`Datastore`.
    """

    def __init__(self, dim: int, *, index: str = "flat", seed: int = 0):
        self.datastore = Datastore(dim, metric="ip", index=index, seed=seed)
        self.tokens = torch.empty(0, dtype=torch.long)  # every example's ids, concatenated
        self.lengths = torch.empty(0, dtype=torch.long)
        self.prompt_lengths = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        """Bytes of the keys (float32), the token ids and the two lengths per example (int64)."""
        return self.datastore.nbytes + self.tokens.nbytes + self.lengths.nbytes + self.prompt_lengths.nbytes

    def examples(self) -> list[torch.Tensor]:
        """Every stored example's token ids, in the order they were added (their ids)."""
        return list(self.tokens.split(self.lengths.tolist()))

    def prompts(self) -> list[torch.Tensor]:
        """Every stored example's prompt (what its key embeds)."""
        return [example[:length] for example, length in zip(self.examples(), self.prompt_lengths.tolist())]

    def add(self, examples: Sequence[torch.Tensor], prompt_lengths: Sequence[int],
            embed: Callable[[Sequence[torch.Tensor]], torch.Tensor]) -> None:
        """Store examples under the embeddings of their prompts.

        Args:
            examples: 1-D token ids, each a prompt followed by its answer.
            prompt_lengths: the prompt's length in each example.
            embed: maps a list of 1-D token tensors to [n, dim] unit embeddings.

        Raises:
            ValueError: lists of different lengths, or a prompt length outside [1, example length].
        """
        if len(examples) != len(prompt_lengths):
            raise ValueError(f"{len(examples)} examples but {len(prompt_lengths)} prompt lengths")
        if not examples:
            return
        for example, length in zip(examples, prompt_lengths):
            if not 1 <= length <= len(example):
                raise ValueError(f"a prompt length must be in [1, {len(example)}] (its example's length), got {length}")
        examples = [example.reshape(-1).cpu() for example in examples]
        prompt_lengths = torch.tensor(list(prompt_lengths), dtype=torch.long)
        self.datastore.add(embed([example[:length] for example, length in zip(examples, prompt_lengths.tolist())]))
        self.tokens = torch.cat([self.tokens, *examples])
        self.lengths = torch.cat([self.lengths, torch.tensor([len(e) for e in examples], dtype=torch.long)])
        self.prompt_lengths = torch.cat([self.prompt_lengths, prompt_lengths])

    def reembed(self, embed: Callable[[Sequence[torch.Tensor]], torch.Tensor]) -> None:
        """Recompute every key with ``embed`` (a fresh index of the same settings)."""
        fresh = Datastore(**self.datastore.settings())
        if len(self):
            fresh.add(embed(self.prompts()))
        self.datastore = fresh

    def search(self, queries: torch.Tensor, k: int) -> list[list[torch.Tensor]]:
        """The ``min(k, len(self))`` examples nearest to each query embedding, nearest first.

        Args:
            queries: [n, dim] embeddings (as ``embed`` gives them).
            k: examples per query (0: none).

        Returns:
            One list of 1-D token tensors per query (empty lists when ``k`` is 0 or the store is empty).
        """
        if k == 0 or len(self) == 0:
            return [[] for _ in range(len(queries))]
        examples = self.examples()
        ids = self.datastore.search(queries, k).ids
        return [[examples[i] for i in row] for row in ids.tolist()]

    def state_dict(self) -> dict[str, Any]:
        """The datastore, token ids and lengths as tensors and plain values (a stream state's format)."""
        return {"datastore": self.datastore.state_dict(), "tokens": self.tokens, "lengths": self.lengths,
                "prompt_lengths": self.prompt_lengths}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ExampleStore:
        """Rebuild a store from :meth:`state_dict` output."""
        datastore = Datastore.from_state_dict(state["datastore"])
        store = cls(datastore.dim)
        store.datastore = datastore
        store.tokens, store.lengths, store.prompt_lengths = state["tokens"], state["lengths"], state["prompt_lengths"]
        return store


@torch.no_grad()
def rag_log_likelihood(model: torch.nn.Module, input_ids: torch.Tensor, retriever: ChunkRetriever, *,
                       local_tokens: int, stride: int, score_from: int) -> tuple[float, int]:
    """Score a long text with retrieved chunks of its own past in place of a long cache.

    Each stride of ``stride`` tokens from ``score_from`` on is read in one forward call after
    ``top_k`` chunks retrieved for the ``local_tokens`` tokens before it, then those tokens. The
    chunks come from the text before those local tokens (whole chunks only) and are added to
    ``retriever`` as the reading goes (it should start empty). The model attends to at most
    ``top_k * chunk_size + local_tokens + stride`` tokens, positions counted from 0 in each call.

    Args:
        model: a causal LM.
        input_ids: [1, tokens] or [tokens].
        retriever: the chunk store (its ``top_k`` and ``chunk_size`` set the retrieved budget).
        local_tokens: the latest tokens kept before each stride (the query of the retrieval), >= 1.
        stride: tokens scored per forward call.
        score_from: first token index whose log-likelihood is summed (>= local_tokens).

    Returns:
        (summed negative log-likelihood, number of scored tokens).

    Raises:
        ValueError: settings out of range.
    """
    ids = input_ids.reshape(-1)
    total = ids.shape[0]
    if local_tokens < 1 or stride < 1:
        raise ValueError(f"local_tokens and stride must be >= 1, got {local_tokens} and {stride}")
    if not local_tokens <= score_from < total:
        raise ValueError(f"score_from must be in [local_tokens={local_tokens}, {total - 1}], got {score_from}")
    nll, scored, stored_until = 0.0, 0, 0
    for start in range(score_from, total, stride):
        local_start = start - local_tokens
        # Only whole chunks that end before the local tokens become retrievable.
        whole_chunks = local_start // retriever.chunk_size
        if whole_chunks * retriever.chunk_size > stored_until:
            retriever.add_chunks(chunk_tokens(ids[stored_until : whole_chunks * retriever.chunk_size], retriever.chunk_size))
            stored_until = whole_chunks * retriever.chunk_size
        local = ids[local_start:start]
        retrieved = [] if len(retriever) == 0 else list(reversed(retriever.retrieve(local)))
        prefix = torch.cat([*retrieved, local]) if retrieved else local
        segment = ids[start : start + stride]
        context = torch.cat([prefix, segment]).unsqueeze(0).to(model.device)
        logits = model(input_ids=context, use_cache=False).logits[0, prefix.shape[0] - 1 : -1]
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, segment.to(logits.device).unsqueeze(-1))
        nll -= float(picked.sum())
        scored += picked.numel()
    return nll, scored
