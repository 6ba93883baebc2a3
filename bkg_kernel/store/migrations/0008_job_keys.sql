-- The API key a run or schedule lives by (the key that started the run, or last turned the schedule on): once it is
-- revoked or expired, the run does not start and the schedule turns itself off. NULL: made by a login session or a
-- Hub token, which stand for the user.
ALTER TABLE job_runs ADD COLUMN key_id VARCHAR;
ALTER TABLE job_schedules ADD COLUMN key_id VARCHAR;
