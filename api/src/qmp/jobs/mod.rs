//! QEMU's background jobs as QMP shows them (qapi/job.json, job.c, job-qmp.c), for the jobs
//! this VMM runs: the whole-VM snapshot commands `snapshot-save`, `snapshot-load` and
//! `snapshot-delete` (qapi/migration.json; their arguments are in [`snapshot`]).
//!
//! The VMM carries the action out synchronously; the monitor wraps it in QEMU's job life:
//! the command creates the job (`created`, `running`: both events before its `{}`), the
//! action's reply concludes it (`waiting`, `pending`, `concluded`; or `aborting`, `concluded`
//! with the error), and, as QEMU creates these jobs with `JOB_MANUAL_DISMISS`, it stays
//! `concluded` in `query-jobs` until `job-dismiss` (`null`). Every status change is a
//! JOB_STATUS_CHANGE event for every client. The list is one per QMP server, shared by its
//! clients, as QEMU's is global.

pub(crate) mod snapshot;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde_json::{json, Map, Value};

use super::commands::CommandError;
use super::events::qmp_event;

/// Jobs kept at most (concluded ones count until dismissed): a client that never dismisses
/// cannot make the list grow without end. QEMU has no limit.
pub(crate) const MAX_JOBS: usize = 256;

/// QEMU's `JobType`s of the jobs this VMM runs (named as QEMU's, whose other job types are
/// not snapshots).
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobType {
    /// `snapshot-save`.
    SnapshotSave,
    /// `snapshot-load`.
    SnapshotLoad,
    /// `snapshot-delete`.
    SnapshotDelete,
}

impl JobType {
    /// QEMU's name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobType::SnapshotSave => "snapshot-save",
            JobType::SnapshotLoad => "snapshot-load",
            JobType::SnapshotDelete => "snapshot-delete",
        }
    }
}

/// QEMU's `JobStatus`es these jobs go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobStatus {
    /// Created, not started.
    Created,
    /// At work.
    Running,
    /// Done, waiting for the other jobs of its transaction (it has none).
    Waiting,
    /// Done, about to finalize.
    Pending,
    /// Failed, finishing.
    Aborting,
    /// Over; stays until dismissed.
    Concluded,
    /// Dismissed (only in the event).
    Null,
}

impl JobStatus {
    /// QEMU's name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }
}

/// One job, as `query-jobs` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Job {
    id: String,
    kind: JobType,
    status: JobStatus,
    current: u64,
    total: u64,
    error: Option<String>,
}

impl Job {
    /// QEMU's `JobInfo`.
    fn info(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), self.id.as_str().into());
        m.insert("type".into(), self.kind.as_str().into());
        m.insert("status".into(), self.status.as_str().into());
        m.insert("current-progress".into(), self.current.into());
        m.insert("total-progress".into(), self.total.into());
        if let Some(e) = &self.error {
            m.insert("error".into(), e.as_str().into());
        }
        Value::Object(m)
    }
}

/// The job list of one QMP server, newest first as QEMU lists it. Cheap to clone; clones share
/// the list.
#[derive(Clone, Default)]
pub(crate) struct Jobs(Arc<Mutex<Vec<Job>>>);

impl fmt::Debug for Jobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.lock().iter()).finish()
    }
}

/// JOB_STATUS_CHANGE for `id` now in `status`.
fn status_event(id: &str, status: JobStatus) -> Value {
    qmp_event(
        "JOB_STATUS_CHANGE",
        Some(json!({"id": id, "status": status.as_str()})),
        SystemTime::now(),
    )
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.` and `_`.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl Jobs {
    fn lock(&self) -> MutexGuard<'_, Vec<Job>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// QEMU's `job_create` and `job_start`: checks the id (QEMU's texts), adds the job and
    /// returns its events, `created` then `running`.
    pub(crate) fn start(&self, id: &str, kind: JobType) -> Result<Vec<Value>, CommandError> {
        if !id_wellformed(id) {
            return Err(CommandError::generic(format!("Invalid job ID '{id}'")));
        }
        let mut jobs = self.lock();
        if jobs.iter().any(|j| j.id == id) {
            return Err(CommandError::generic(format!(
                "Job ID '{id}' already in use"
            )));
        }
        if jobs.len() >= MAX_JOBS {
            return Err(CommandError::generic(format!(
                "too many jobs (at most {MAX_JOBS}); dismiss concluded ones with job-dismiss"
            )));
        }
        jobs.insert(
            0,
            Job {
                id: id.to_string(),
                kind,
                status: JobStatus::Running,
                current: 0,
                total: 0,
                error: None,
            },
        );
        Ok(vec![
            status_event(id, JobStatus::Created),
            status_event(id, JobStatus::Running),
        ])
    }

    /// The job's work is over: `Ok` goes through `waiting` and `pending`, an error through
    /// `aborting` (and is kept as the job's `error`), both to `concluded`, the one step of
    /// work done (QEMU counts 1 of 1 either way). The events, in order; none for an unknown
    /// or already concluded job.
    pub(crate) fn finish(&self, id: &str, result: Result<(), String>) -> Vec<Value> {
        let mut jobs = self.lock();
        let Some(job) = jobs
            .iter_mut()
            .find(|j| j.id == id && j.status == JobStatus::Running)
        else {
            return Vec::new();
        };
        job.current = 1;
        job.total = 1;
        let steps: &[JobStatus] = match result {
            Ok(()) => &[JobStatus::Waiting, JobStatus::Pending, JobStatus::Concluded],
            Err(e) => {
                job.error = Some(e);
                &[JobStatus::Aborting, JobStatus::Concluded]
            }
        };
        job.status = JobStatus::Concluded;
        steps.iter().map(|s| status_event(id, *s)).collect()
    }

    /// `job-dismiss`: removes a concluded job; its `null` event. QEMU's texts for an unknown
    /// job and for one that is not over.
    pub(crate) fn dismiss(&self, id: &str) -> Result<Vec<Value>, CommandError> {
        let mut jobs = self.lock();
        let Some(i) = jobs.iter().position(|j| j.id == id) else {
            return Err(CommandError::generic("Job not found"));
        };
        if jobs[i].status != JobStatus::Concluded {
            return Err(CommandError::generic(format!(
                "Job '{id}' in state '{}' cannot accept command verb 'dismiss'",
                jobs[i].status.as_str()
            )));
        }
        jobs.remove(i);
        Ok(vec![status_event(id, JobStatus::Null)])
    }

    /// `query-jobs`' answer.
    pub(crate) fn query(&self) -> Value {
        Value::Array(self.lock().iter().map(Job::info).collect())
    }
}

#[cfg(test)]
mod tests;
