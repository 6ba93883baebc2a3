-- The notebook run a key was made for (its id), set only when the gateway makes a run's key: a run key is never
-- rotated, what a run's kernel makes with it lives by the key that started the run, and one that no live run holds
-- is revoked at start. NULL: every other key. Before this column a run key was known by its name alone, which any
-- key's maker could give; such names are refused now (a key named so before is revoked at the next start).
ALTER TABLE api_keys ADD COLUMN run_id VARCHAR;
