"""The job queue across hosts (REDIS_URL): RQ on Redis. docs/SCALE_OUT.md describes it."""
