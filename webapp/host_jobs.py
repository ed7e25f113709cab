"""This host's job system, wired once: GPU tokens, the lease journal and its keeper, the job store,
the job runner and the queue.

Two programs run it: the web service of one host (`create_app`), and the GPU worker of the RQ
mode (`python -m webapp.worker`), which hands it one job of the shared queue at a time. Building
it in one place is what makes the GPU worker run exactly the one-host job code: the same leases
(the runner ended before the tokens go back), the same runners started ahead and kept warm, the
same reconciliation of what a killed predecessor left (orphaned runners ended, leases released)
before the first job. The caller holds the data-folder lock.

They differ in what a restart resumes. The one-host service resumes the jobs its store recovers.
A GPU worker resumes nothing: the jobs it ran belong to the shared queue, whose record of them
says `gpu_worker_lost` (webapp/queue_rq/gpu_worker.py), so its job folders are removed.
"""
from __future__ import annotations

from webapp.checkpoints import inspect_checkpoints
from webapp.gpu_tokens import make_tokens
from webapp.job_queue import JobManager, log_listener
from webapp.job_runner import JobRunner
from webapp.job_state import Job
from webapp.job_store import JobStore
from webapp.journal import Journal
from webapp.lease_keeper import LeaseKeeper
from webapp.leases import Leases
from webapp.runner_registry import RunnerRegistry
from webapp.service import PROJECT_ROOT, Service, runner_command
from webapp.uploads import jobs_root, remove_entries, tmp_root


def build(settings, data_lock, resume: bool) -> tuple[Service, list[Job], dict]:
    """(the service, the jobs to resume, what start-up found) for this host."""
    ckpt = inspect_checkpoints(settings.acestep_checkpoints, settings.acestep_engine, settings.acestep_config_path)
    tokens = make_tokens(settings)
    journal = Journal(settings.data_dir)
    registry = RunnerRegistry(journal)
    leases = Leases(tokens, journal, settings.runner_kill_grace_s, settings)
    keeper = LeaseKeeper(leases, journal, registry, settings.runner_kill_grace_s)
    reconciled = keeper.reconcile()  # orphans ended, dead holders' leases released: before any job runs
    store = JobStore(settings.data_dir, settings.result_ttl_s)
    store.add_listener(log_listener)
    if resume:
        resumed, recovered = store.recover()
    else:
        resumed, recovered = [], {"removed": remove_entries(jobs_root(settings.data_dir), tmp_root(settings.data_dir))}
    runner = JobRunner(settings, store, leases, registry, runner_command(settings), PROJECT_ROOT, demo=ckpt.demo)
    jobs = JobManager(settings, store, runner)
    service = Service(settings=settings, jobs=jobs, tokens=tokens, checkpoints=ckpt, leases=leases, keeper=keeper,
                      data_lock=data_lock)
    return service, resumed, {**recovered, **reconciled}
