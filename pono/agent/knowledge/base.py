"""The knowledge base: ingest documents into pgvector, and hybrid search (vectors + full text, fused by RRF)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np

from pono.agent.knowledge.documents import chunk_text
from pono.agent.knowledge.embedder import DIM, MiniLMEmbedder

_RRF_K = 60  # the usual reciprocal-rank-fusion constant: rank 1 → 1/61
_CANDIDATES = 20


@dataclass
class IngestResult:
    document_id: str
    source: str
    status: str  # "created", "replaced" or "unchanged"
    chunks: int


class RemoteEmbedder:
    """An OpenAI-compatible /embeddings endpoint, asked for the column's 384 dimensions."""

    def __init__(self, base_url: str, api_key: str, model: str) -> None:
        import openai

        self.model = model
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=30, max_retries=2)

    async def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), np.float32)
        response = await self.client.embeddings.create(model=self.model, input=texts, dimensions=DIM)
        vectors = np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], np.float32)
        if vectors.shape != (len(texts), DIM):
            raise ValueError(f"the embeddings endpoint returned {vectors.shape[-1]} dimensions; {DIM} are needed")
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class KnowledgeBase:
    def __init__(self, pool: asyncpg.Pool, embedder: MiniLMEmbedder | None = None,
                 remote: RemoteEmbedder | None = None) -> None:
        self.pool = pool
        self._embedder = embedder
        self.remote = remote
        self._lock = asyncio.Lock()

    async def embedder(self) -> MiniLMEmbedder:
        async with self._lock:  # loaded once, on first use, off the event loop
            if self._embedder is None:
                self._embedder = await asyncio.to_thread(MiniLMEmbedder)
        return self._embedder

    async def embed(self, texts: list[str]) -> np.ndarray:
        if self.remote is not None:
            return await self.remote.embed(texts)
        return await asyncio.to_thread((await self.embedder()).embed, texts)

    async def ingest(self, collection: str, source: str, text: str, *, title: str | None = None,
                     metadata: dict[str, Any] | None = None) -> IngestResult:
        """Store a document and its chunks in one transaction. An unchanged document is skipped; a changed
        one has its chunks replaced. Hashing and chunking run in a worker thread (a big document takes a while)."""
        digest = await asyncio.to_thread(lambda: hashlib.sha256(text.encode()).hexdigest())
        existing = await self.pool.fetchrow(
            "SELECT id, content_hash FROM documents WHERE collection = $1 AND source = $2 AND deleted_at IS NULL",
            collection, source)
        if existing is not None and existing["content_hash"] == digest:
            count = await self.pool.fetchval("SELECT count(*) FROM chunks WHERE document_id = $1", existing["id"])
            return IngestResult(str(existing["id"]), source, "unchanged", count)
        chunks = await asyncio.to_thread(chunk_text, text)
        vectors = await self.embed([c.text for c in chunks])  # before the transaction: it holds no lock while
        async with self.pool.acquire() as conn, conn.transaction():
            if existing is None:
                doc_id = await conn.fetchval(
                    "INSERT INTO documents (collection, source, title, content_hash, metadata)"
                    " VALUES ($1, $2, $3, $4, $5::jsonb) RETURNING id",
                    collection, source, title, digest, json.dumps(metadata or {}))
                status = "created"
            else:
                doc_id = existing["id"]
                await conn.execute("DELETE FROM chunks WHERE document_id = $1", doc_id)
                await conn.execute(
                    "UPDATE documents SET content_hash = $2, title = $3, metadata = $4::jsonb, updated_at = now()"
                    " WHERE id = $1", doc_id, digest, title, json.dumps(metadata or {}))
                status = "replaced"
            await conn.executemany(
                "INSERT INTO chunks (document_id, idx, text, start_offset, end_offset, metadata, embedding)"
                " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7)",
                [(doc_id, i, c.text, c.start, c.end, json.dumps(c.metadata), vectors[i]) for i, c in enumerate(chunks)])
        return IngestResult(str(doc_id), source, status, len(chunks))

    async def search(self, query: str, collections: list[str], k: int = 5) -> list[dict[str, Any]]:
        """Hybrid search: HNSW nearest neighbours and full-text rank, fused by reciprocal rank."""
        if not query.strip() or not collections:
            return []
        vector = (await self.embed([query]))[0]
        columns = ("SELECT c.id, c.text, c.start_offset, c.end_offset, c.metadata, d.source, d.title, d.id AS doc"
                   " FROM chunks c JOIN documents d ON d.id = c.document_id")
        live = "d.collection = ANY($1::text[]) AND d.deleted_at IS NULL"
        async with self.pool.acquire() as conn:
            by_vector = await conn.fetch(
                f"{columns} WHERE {live} ORDER BY c.embedding <=> $2 LIMIT {_CANDIDATES}", collections, vector)
            # Full text: any of the query's words may match (OR), ranked by cover density. Each word is parsed
            # by plainto_tsquery as the chunks were (so "db.example.com:5432" or "a & !b" is words, not syntax).
            by_text = await conn.fetch(
                f"{columns} CROSS JOIN (SELECT tsquery_or_agg(plainto_tsquery('english', w)) AS q"
                f" FROM regexp_split_to_table($2, '\\s+') AS w) AS words WHERE {live} AND c.text_search @@ words.q"
                f" ORDER BY ts_rank_cd(c.text_search, words.q) DESC LIMIT {_CANDIDATES}", collections, query)
        scores: dict[int, float] = {}
        rows: dict[int, asyncpg.Record] = {}
        for ranking in (by_vector, by_text):
            for rank, row in enumerate(ranking, 1):
                scores[row["id"]] = scores.get(row["id"], 0.0) + 1.0 / (_RRF_K + rank)
                rows[row["id"]] = row
        best = sorted(scores, key=scores.__getitem__, reverse=True)[:k]
        return [{"text": rows[i]["text"], "document": rows[i]["source"], "title": rows[i]["title"],
                 "document_id": str(rows[i]["doc"]), "score": round(scores[i], 5),
                 "start": rows[i]["start_offset"], "end": rows[i]["end_offset"],
                 "heading": json.loads(rows[i]["metadata"]).get("heading")} for i in best]
