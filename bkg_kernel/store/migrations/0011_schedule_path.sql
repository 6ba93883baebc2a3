-- The notebook file a schedule was made for, its full path: each fire runs that file (or fails naming it), never
-- another root's file of the same name. NULL: made before this column; such a schedule resolves its name.
ALTER TABLE job_schedules ADD COLUMN path VARCHAR;
