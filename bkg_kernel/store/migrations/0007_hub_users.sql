-- What JupyterHub said of each Hub user when bkg last derived their role from their own token: their Hub name and
-- the Hub's view of them (admin flag, roles, groups and each group's roles). A run acting as a Hub user, with no
-- token of theirs at hand, starts only while the Hub's view is still this one.
CREATE TABLE hub_users (
    user_id      VARCHAR PRIMARY KEY,
    hub_name     VARCHAR NOT NULL,
    role         VARCHAR NOT NULL,
    seen         JSON NOT NULL,
    confirmed_at TIMESTAMP NOT NULL
);
