"""Notebook jobs: papermill runs of notebooks under `job_roots`, queued, kept, scheduled and notified.

`service.JobService` lives in the gateway; runs execute in job workers (`worker.py`, a warm kernel each) or on a
Dask cluster (`cluster.py`), never in the gateway process.
"""
