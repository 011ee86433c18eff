"""Retrieval quality and speed on the knowledge fixtures, against a real Postgres with pgvector.

    .venv/bin/python bench/rag.py [--copies 20]

Prints hit@3 and MRR on tests/fixtures/knowledge/queries.jsonl, query latency (p50/p99) and ingest
throughput in chunks per second (the fixture corpus ingested --copies times under different names).
Uses DATABASE_URL when set, else an embedded Postgres in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from pono.agent.knowledge.base import KnowledgeBase
from pono.agent.knowledge.documents import extract_text, kind_of
from pono.agent.knowledge.evaluate import ingest_folder, retrieval_scores
from pono.storage.db import Database
from pono.storage.embedded import EmbeddedPostgres

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "knowledge"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=20)
    args = ap.parse_args()
    embedded = None
    dsn = os.environ.get("DATABASE_URL")
    if not dsn:
        embedded = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pono-rag-bench-")))
        dsn = await embedded.start()
    db = Database(dsn, min_size=1, max_size=4)
    await db.connect()
    try:
        knowledge = KnowledgeBase(db.pool)
        await knowledge.embed(["warm up"])
        collection = f"bench-{uuid.uuid4().hex[:6]}"
        await ingest_folder(knowledge, FIXTURES, collection)
        scores = await retrieval_scores(knowledge, FIXTURES, collection, k=3)

        queries = [json.loads(line)["query"] for line in (FIXTURES / "queries.jsonl").read_text().splitlines()]
        timings = []
        for _ in range(10):
            for query in queries:
                started = time.perf_counter()
                await knowledge.search(query, [collection], 5)
                timings.append((time.perf_counter() - started) * 1000)
        timings.sort()

        texts = [(p.name, extract_text(p.read_bytes(), kind_of(p))) for p in sorted(FIXTURES.iterdir())
                 if p.suffix in (".md", ".html", ".txt")]
        bulk = f"bulk-{uuid.uuid4().hex[:6]}"
        chunks = 0
        started = time.perf_counter()
        for copy in range(args.copies):
            for name, text in texts:
                chunks += (await knowledge.ingest(bulk, f"{copy}-{name}", f"Copy {copy}.\n\n{text}")).chunks
        ingest_s = time.perf_counter() - started
    finally:
        await db.close()
        if embedded is not None:
            await embedded.stop()
    print(f"Pono RAG ({'DATABASE_URL' if embedded is None else 'embedded Postgres 18 + pgvector'}, "
          "all-MiniLM-L6-v2 in numpy)")
    print(f"  {scores['queries']} queries: hit@3 {scores['hit@3']:.3f}, MRR {scores['mrr']:.3f}"
          + (f"; missed: {scores['misses']}" if scores["misses"] else ""))
    print(f"  query latency (embed + vector + full text + fusion): p50 {statistics.median(timings):.1f} ms, "
          f"p99 {timings[int(0.99 * (len(timings) - 1))]:.1f} ms")
    print(f"  ingest: {chunks / ingest_s:.0f} chunks per second ({chunks} chunks in {ingest_s:.2f} s)")


if __name__ == "__main__":
    asyncio.run(main())
