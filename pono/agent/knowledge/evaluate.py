"""Retrieval quality on labelled queries (shared by the test and bench/rag.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from pono.agent.knowledge.base import KnowledgeBase
from pono.agent.knowledge.documents import extract_text, kind_of


async def ingest_folder(knowledge: KnowledgeBase, folder: Path, collection: str) -> int:
    def read_all() -> list[tuple[str, str]]:
        return [(p.name, extract_text(p.read_bytes(), kind_of(p))) for p in sorted(folder.iterdir())
                if p.suffix in (".md", ".html", ".txt", ".pdf")]

    chunks = 0
    for name, text in await asyncio.to_thread(read_all):
        chunks += (await knowledge.ingest(collection, name, text)).chunks
    return chunks


async def retrieval_scores(knowledge: KnowledgeBase, folder: Path, collection: str, k: int = 3) -> dict[str, object]:
    """hit@k and MRR over queries.jsonl: each query names the document that must be found."""
    raw = await asyncio.to_thread((folder / "queries.jsonl").read_text)
    queries = [json.loads(line) for line in raw.splitlines() if line.strip()]
    hits, reciprocal, misses = 0, 0.0, []
    for q in queries:
        docs = [r["document"] for r in await knowledge.search(q["query"], [collection], 10)]
        rank = docs.index(q["document"]) + 1 if q["document"] in docs else None
        if rank is not None and rank <= k:
            hits += 1
        else:
            misses.append(q["query"])
        reciprocal += 1.0 / rank if rank else 0.0
    return {"queries": len(queries), f"hit@{k}": hits / len(queries), "mrr": reciprocal / len(queries),
            "misses": misses}
