-- The notebook file a run ran, its full path: a retry runs that file again (or fails naming it), never another
-- root's file of the same name. NULL: a run kept from before this column; its retry finds its notebook by name.
ALTER TABLE job_runs ADD COLUMN path VARCHAR;
