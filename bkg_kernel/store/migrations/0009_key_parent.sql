-- The key a key derives from: the one it was made with for its own user, or the key that started the notebook run
-- it was made for. It expires no later and is revoked with it.
ALTER TABLE api_keys ADD COLUMN parent_id VARCHAR;
