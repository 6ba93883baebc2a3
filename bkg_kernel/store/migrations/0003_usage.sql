-- Token usage per request of the LLM routes, for per-key and per-user usage reports.
CREATE TABLE usage (
    created_at        TIMESTAMP NOT NULL DEFAULT current_timestamp,
    key_id            VARCHAR,
    user_id           VARCHAR,
    username          VARCHAR,
    route             VARCHAR NOT NULL,
    model             VARCHAR,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL
);
