-- Notebook jobs: every run (kept after a restart; a run that was running when the gateway died is marked failed
-- at the next start) and every schedule (cron + time zone, as its owner).
CREATE TABLE job_runs (
    id VARCHAR PRIMARY KEY,
    notebook VARCHAR NOT NULL,
    parameters JSON,
    state VARCHAR NOT NULL,
    owner VARCHAR NOT NULL,
    owner_id VARCHAR NOT NULL,
    scopes VARCHAR[] NOT NULL,
    schedule_id VARCHAR,
    retry_of VARCHAR,
    attempt INTEGER NOT NULL DEFAULT 1,
    retries INTEGER NOT NULL DEFAULT 0,
    timeout_s DOUBLE,
    executor VARCHAR,
    created_at DOUBLE NOT NULL,
    started_at DOUBLE,
    finished_at DOUBLE,
    cells_done INTEGER NOT NULL DEFAULT 0,
    cells_total INTEGER NOT NULL DEFAULT 0,
    output_path VARCHAR,
    html_path VARCHAR,
    error JSON,
    message VARCHAR
);
CREATE TABLE job_schedules (
    id VARCHAR PRIMARY KEY,
    notebook VARCHAR NOT NULL,
    parameters JSON,
    cron VARCHAR NOT NULL,
    timezone VARCHAR NOT NULL,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    owner VARCHAR NOT NULL,
    owner_id VARCHAR NOT NULL,
    scopes VARCHAR[] NOT NULL,
    timeout_s DOUBLE,
    retries INTEGER NOT NULL DEFAULT 0,
    webhook_url VARCHAR,
    notify_success BOOLEAN NOT NULL DEFAULT FALSE,
    created_at DOUBLE NOT NULL,
    last_fire DOUBLE,
    last_run_id VARCHAR
);
