-- A collection's next place in a scroll (a point's `seq`, kept by a re-upsert and a compaction): kept here, as
-- `next_fid` is, so that neither a compaction that lowers `next_fid` nor deleting the points with the highest places
-- hands out a place again after a restart (a scroll under way would skip the new point). NULL: a collection from
-- before this column; its points' places and `next_fid` bound it.
ALTER TABLE collections ADD COLUMN IF NOT EXISTS next_seq BIGINT;
