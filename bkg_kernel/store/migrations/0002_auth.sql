-- Users, roles, API keys, sessions and the audit log (the apikeys plugin).
CREATE TABLE roles (
    name        VARCHAR PRIMARY KEY,
    scopes      VARCHAR[] NOT NULL,
    builtin     BOOLEAN NOT NULL DEFAULT FALSE,
    description VARCHAR NOT NULL DEFAULT ''
);
CREATE TABLE users (
    id            VARCHAR PRIMARY KEY,
    username      VARCHAR NOT NULL UNIQUE,
    role          VARCHAR NOT NULL,
    password_hash VARCHAR,
    disabled      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE TABLE api_keys (
    id                 VARCHAR PRIMARY KEY,
    prefix             VARCHAR NOT NULL UNIQUE,
    secret_hash        VARCHAR NOT NULL,
    name               VARCHAR NOT NULL,
    user_id            VARCHAR NOT NULL,
    scopes             VARCHAR[] NOT NULL,
    rate_limit_per_min INTEGER,
    created_at         TIMESTAMP NOT NULL DEFAULT current_timestamp,
    expires_at         TIMESTAMP,
    last_used_at       TIMESTAMP,
    rotated_at         TIMESTAMP,
    revoked_at         TIMESTAMP
);
CREATE TABLE sessions (
    token_hash VARCHAR PRIMARY KEY,
    user_id    VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    expires_at TIMESTAMP NOT NULL
);
CREATE SEQUENCE audit_seq START 1;
CREATE TABLE audit (
    id     BIGINT PRIMARY KEY DEFAULT nextval('audit_seq'),
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    actor  VARCHAR,
    action VARCHAR NOT NULL,
    target VARCHAR,
    ok     BOOLEAN NOT NULL DEFAULT TRUE,
    detail JSON
);
