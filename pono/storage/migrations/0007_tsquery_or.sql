-- Any-word full-text search: the OR of many tsqueries, each made by plainto_tsquery (never written by hand, so
-- what people type, "db.example.com:5432" or "a & !b", is never read as tsquery syntax).
CREATE AGGREGATE tsquery_or_agg (tsquery) (SFUNC = tsquery_or, STYPE = tsquery);
