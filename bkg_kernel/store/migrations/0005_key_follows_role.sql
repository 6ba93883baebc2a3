-- A key created without an explicit scope list follows its user's role: it holds whatever the role holds now.
ALTER TABLE api_keys ADD COLUMN follows_role BOOLEAN DEFAULT FALSE;
