-- Catalog of collections. Each collection's points live in their own table (points_table),
-- so dropping one is a DROP TABLE and its full-text index is its own.
CREATE TABLE collections (
    name         VARCHAR PRIMARY KEY,
    points_table VARCHAR NOT NULL UNIQUE,
    dim          INTEGER NOT NULL,
    metric       VARCHAR NOT NULL,
    index_kind   VARCHAR NOT NULL,
    params       JSON NOT NULL,
    -- FAISS position of the next vector; positions are append-only until a compaction renumbers them.
    next_fid     BIGINT NOT NULL DEFAULT 0,
    -- Bumped when positions are renumbered: an index file from another epoch is rebuilt.
    epoch        INTEGER NOT NULL DEFAULT 0,
    -- Bumped by every change to the collection's text, so the full-text index knows it is stale.
    text_version BIGINT NOT NULL DEFAULT 0,
    fts_version  BIGINT NOT NULL DEFAULT -1,
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp,
    updated_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE SEQUENCE points_table_seq START 1;
