"""Searches take what people type: host:port, tsquery operators, stray quotes, LIKE wildcards. Through the HTTP
API, against real Postgres: call history and knowledge (full text), and the audit log (an action prefix)."""

from __future__ import annotations

import uuid

import aiohttp
from conftest import RunningServer

from pono.agent.knowledge.base import _RRF_K
from pono.context import SERVICES

TEXT = "The replica lost db.example.com:5432 at noon; fail over to https://backup.example.com/a:b please."
# Each of these once built a tsquery by hand and broke it ("syntax error in tsquery"), or could have.
QUERIES = ["db.example.com:5432", "a & b | !c", '"unclosed', ":*", "foo:A", "it's", "'", "\\", "(", "a <-> b",
           "!", "-5", "https://backup.example.com/a:b", "or", "&|!:*()<>'\"", "5432:*", "db.example.com:5432 noon"]


async def test_search_answers_every_query_people_type(server: RunningServer, admin_token: str) -> None:
    pool = server.app[SERVICES].storage.db.pool
    call_id = f"search-{uuid.uuid4().hex[:10]}"
    await pool.execute("INSERT INTO calls (id, transport, replica, started_at) VALUES ($1, 'webrtc', 't', now())",
                       call_id)
    await pool.execute("INSERT INTO turns (call_id, idx, role, text) VALUES ($1, 0, 'user', $2)", call_id, TEXT)
    collection = f"search-{uuid.uuid4().hex[:6]}"
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with aiohttp.ClientSession(server.url, headers=headers) as http:
        async with http.post(f"/api/knowledge/{collection}/documents", json={"source": "ops.md", "text": TEXT}) as r:
            assert r.status == 201, await r.text()
        for query in QUERIES:
            async with http.get("/api/calls", params={"q": query}) as r:
                assert r.status == 200, (query, await r.text())
            async with http.get(f"/api/knowledge/{collection}/search", params={"q": query}) as r:
                assert r.status == 200, (query, await r.text())
        # The words of a host:port query are found, not only tolerated.
        async with http.get("/api/calls", params={"q": "db.example.com:5432", "limit": "100"}) as r:
            assert call_id in [c["id"] for c in (await r.json())["calls"]]
        async with http.get("/api/calls", params={"q": "db.example.com:5432 penguins", "limit": "100"}) as r:
            assert call_id not in [c["id"] for c in (await r.json())["calls"]]
        # Knowledge: the one chunk is always the nearest vector (1/61); when its words match too, it is also the
        # first full-text hit, and the fused score doubles (2/61). So the score shows whether full text matched.
        for query, words_match in (("db.example.com:5432 penguins", True), ("https://backup.example.com/a:b", True),
                                   ("penguins", False)):
            async with http.get(f"/api/knowledge/{collection}/search", params={"q": query}) as r:
                (hit,) = (await r.json())["results"]
            assert hit["score"] == round((2 if words_match else 1) / (_RRF_K + 1), 5), query


async def test_audit_action_prefix_is_a_prefix_not_a_pattern(server: RunningServer, admin_token: str) -> None:
    """`?action=` once went into LIKE as it came: "_" and "%" matched any character(s)."""
    pool = server.app[SERVICES].storage.db.pool
    tag = uuid.uuid4().hex[:8]
    for action in (f"t{tag}.a_b", f"t{tag}.axb", f"t{tag}.a%c"):
        await pool.execute("INSERT INTO audit_log (actor, action) VALUES ('test', $1)", action)
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with aiohttp.ClientSession(server.url, headers=headers) as http:
        for prefix, expected in ((f"t{tag}.a_", [f"t{tag}.a_b"]), (f"t{tag}.a%", [f"t{tag}.a%c"]),
                                 (f"t{tag}.", [f"t{tag}.a%c", f"t{tag}.axb", f"t{tag}.a_b"]), (f"t{tag}\\", [])):
            async with http.get("/api/audit", params={"action": prefix, "limit": "1000"}) as r:
                assert r.status == 200, await r.text()
                assert [e["action"] for e in (await r.json())["entries"]] == expected, prefix
