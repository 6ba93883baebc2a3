-- The key that made a key for another user, when it had an expiry or a rate limit (a bounded delegate): the key it
-- made draws on its rate limit's bucket, expires no later and is revoked with it, as a key derived from it would.
-- NULL: made by a key with neither, a login session, the gateway, for the key's own user, or before this column.
ALTER TABLE api_keys ADD COLUMN maker_id VARCHAR;
