//! Fleet jobs: one operation (a command, a desired-state patch, or a
//! firmware image to install) rolled
//! out over a set of devices at a rate, stopped by an abort rule.
//!
//! A job's devices are fixed when it is created (a tag selector is
//! resolved then). The [`runner`] ticks every active job a few times a
//! second; each tick runs in one store transaction with the job's row
//! locked (on PostgreSQL `FOR UPDATE SKIP LOCKED`, so instances take turns
//! and a killed one leaves nothing half done):
//!
//! 1. in-progress devices are brought up to date from their command (or
//!    their state row, for a desired-state job): succeeded, failed, timed
//!    out (no answer within the device timeout after delivery, or never
//!    reached by the job's deadline), cancelled;
//! 2. the abort rule is evaluated on those counts: tripped, the job stops
//!    and no device that was not started is ever touched;
//! 3. otherwise the devices the rate allows by now are started: each one's
//!    command is created (or its desired state patched) in the same
//!    transaction that marks it in progress, so a device is started at most
//!    once whichever instance does it; its session is then woken wherever
//!    it is connected, and an offline device gets it when it comes back.
//!
//! The rules are the pure functions here; the stores keep the rows
//! (`store/sqlite/jobs.rs`, `store/postgres/jobs.rs`).

pub mod runner;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Key/value tags of a device.
pub type Tags = BTreeMap<String, String>;

/// Why tags or a selector were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// A key breaks the rules.
    #[error("tag key {0:?}: use 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    Key(String),
    /// A value breaks the rules.
    #[error("tag value for {0:?}: at most 256 bytes, no control characters")]
    Value(String),
    /// Too many tags on one device.
    #[error("at most {max} tags per device")]
    TooMany {
        /// The limit.
        max: usize,
    },
    /// A selector term is not `key:value`.
    #[error("tag selector {0:?}: expected key:value")]
    Selector(String),
}

/// Tags a device may have at most.
pub const MAX_TAGS: usize = 32;

/// Checks a tag key: 1 to 64 bytes of `[A-Za-z0-9._-]` (no `:`, which
/// separates key and value in selectors).
pub fn check_key(k: &str) -> Result<(), TagError> {
    let ok = (1..=64).contains(&k.len())
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(TagError::Key(k.to_owned()))
    }
}

/// Checks a tag value: at most 256 bytes, no control characters.
pub fn check_value(k: &str, v: &str) -> Result<(), TagError> {
    if v.len() > 256 || v.chars().any(char::is_control) {
        Err(TagError::Value(k.to_owned()))
    } else {
        Ok(())
    }
}

/// Parses selector terms `key:value` (all must match).
pub fn parse_selector(terms: &[String]) -> Result<Tags, TagError> {
    let mut out = Tags::new();
    for t in terms {
        let (k, v) = t
            .split_once(':')
            .ok_or_else(|| TagError::Selector(t.clone()))?;
        check_key(k)?;
        check_value(k, v)?;
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// Which devices a job covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// Every device carrying all these tags when the job is created.
    Tags(Tags),
    /// These devices.
    Devices(Vec<String>),
}

/// What a job does to each device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Send a command; the device's answer is the outcome.
    Command {
        /// Its name.
        name: String,
        /// Content type byte (validated).
        content_type: u8,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// Merge this patch (a JSON object) into the desired state; the device
    /// succeeds once it confirmed that version and reports what it holds.
    Desired {
        /// The patch, compact JSON of an object.
        patch: String,
    },
    /// Install a firmware image: the device is offered it (when one of the
    /// job's download slots on its instance is free) and succeeds once it
    /// reports running `version`, fails once it reports `failed`.
    Firmware {
        /// The image's id (hex SHA-256).
        image: String,
        /// The version it installs (the image's).
        version: String,
        /// Devices of this job downloading at once per gateway instance.
        max_downloads: u32,
    },
}

/// How a firmware job's parameters are stored (`op_payload`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FirmwareParams {
    /// The version the image installs.
    pub version: String,
    /// Devices downloading at once per instance.
    pub max_downloads: u32,
}

impl Operation {
    /// `command`, `desired` or `firmware`, as stored.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Command { .. } => "command",
            Self::Desired { .. } => "desired",
            Self::Firmware { .. } => "firmware",
        }
    }

    /// The stored columns: name, content type, payload.
    pub fn columns(&self) -> (String, u8, Vec<u8>) {
        match self {
            Self::Command {
                name,
                content_type,
                payload,
            } => (name.clone(), *content_type, payload.clone()),
            Self::Desired { patch } => (String::new(), 0, patch.clone().into_bytes()),
            Self::Firmware {
                image,
                version,
                max_downloads,
            } => {
                let p = FirmwareParams {
                    version: version.clone(),
                    max_downloads: *max_downloads,
                };
                (image.clone(), 0, serde_json::to_vec(&p).unwrap_or_default())
            }
        }
    }
}

/// Stop the job when more than `failed_pct` % of at least `min_completed`
/// completed devices failed (or timed out).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AbortRule {
    /// Percentage of completed devices that failed or timed out.
    pub failed_pct: f64,
    /// Completed devices needed before the rule is looked at.
    pub min_completed: u64,
}

/// A job to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Which devices.
    pub target: Target,
    /// What to do.
    pub operation: Operation,
    /// Devices started per minute (0: all at once).
    pub rate_per_min: u32,
    /// When to stop early.
    pub abort: Option<AbortRule>,
    /// How long a device has after its operation reached it.
    pub device_timeout_ms: u64,
    /// When the job ends, Unix ms: devices not reached by then time out.
    pub deadline_ms: u64,
    /// Who created it (the audit log's actor).
    pub created_by: String,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Starting devices at its rate.
    Running,
    /// Every device finished (or the deadline passed).
    Completed,
    /// The abort rule tripped.
    Aborted,
    /// An operator cancelled it.
    Cancelled,
}

impl JobStatus {
    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Aborted => "aborted",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => Self::Running,
            "completed" => Self::Completed,
            "aborted" => Self::Aborted,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// Where one device is in a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Not started yet.
    Queued,
    /// Started: its command or desired state is out.
    InProgress,
    /// Done well.
    Succeeded,
    /// The device answered "failed" (or did not know the command).
    Failed,
    /// Not answered in time, or not reached by the deadline.
    TimedOut,
    /// The job stopped before the device was done (never started, or its
    /// operation had not reached it).
    Cancelled,
}

impl DeviceState {
    /// Every state, in order.
    pub const ALL: [Self; 6] = [
        Self::Queued,
        Self::InProgress,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
    ];

    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::InProgress => "in_progress",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Whether the device is done with the job.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::InProgress)
    }
}

/// Devices of a job by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Counts {
    /// Not started.
    pub queued: u64,
    /// Started, not done.
    pub in_progress: u64,
    /// Done well.
    pub succeeded: u64,
    /// Failed.
    pub failed: u64,
    /// Timed out.
    pub timed_out: u64,
    /// Cancelled.
    pub cancelled: u64,
}

impl Counts {
    /// Adds `n` devices in `state`.
    pub fn add(&mut self, state: DeviceState, n: u64) {
        *match state {
            DeviceState::Queued => &mut self.queued,
            DeviceState::InProgress => &mut self.in_progress,
            DeviceState::Succeeded => &mut self.succeeded,
            DeviceState::Failed => &mut self.failed,
            DeviceState::TimedOut => &mut self.timed_out,
            DeviceState::Cancelled => &mut self.cancelled,
        } += n;
    }

    /// Every device.
    pub fn total(&self) -> u64 {
        self.queued
            + self.in_progress
            + self.succeeded
            + self.failed
            + self.timed_out
            + self.cancelled
    }

    /// Devices with an outcome the abort rule counts.
    pub fn completed(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out
    }
}

/// A stored job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Its id.
    pub id: u64,
    /// Where it is.
    pub status: JobStatus,
    /// Which devices (as asked).
    pub target: Target,
    /// What it does.
    pub operation: Operation,
    /// Devices started per minute (0: all at once).
    pub rate_per_min: u32,
    /// When to stop early.
    pub abort: Option<AbortRule>,
    /// Time a device has after its operation reached it.
    pub device_timeout_ms: u64,
    /// When it ends, Unix ms.
    pub deadline_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// Created, Unix ms (the rollout counts from here).
    pub created_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
    /// When it stopped starting devices, if it has.
    pub finished_ms: Option<u64>,
    /// Why it stopped (the abort rule's figures, a deadline, a cancel).
    pub reason: Option<String>,
    /// Devices started so far.
    pub started: u64,
    /// Devices by state.
    pub counts: Counts,
}

/// One device's part of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JobDevice {
    /// The device.
    pub device_id: String,
    /// Where it is.
    pub state: DeviceState,
    /// When it was started, Unix ms.
    pub started_ms: Option<u64>,
    /// When it finished, Unix ms.
    pub finished_ms: Option<u64>,
    /// Its command (a command job).
    pub command_id: Option<u64>,
    /// The desired version it must confirm (a desired-state job).
    pub desired_version: Option<u64>,
}

/// Whether device `id` is among a stable `share` (0 to 1) of all ids, by
/// a hash of the id: the same devices in every run and build (`furrow sim
/// --fail-share`, and tests that check a simulated fleet's records).
pub fn in_share(id: &str, share: f64) -> bool {
    // FNV-1a: stable across runs and builds (std's hasher is not).
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    ((h % 10_000) as f64) < share * 10_000.0
}

/// How many more devices the rate allows to start by `now_ms`: the first
/// at once, then `rate_per_min` a minute (all of them when 0).
pub fn allowance(job: &JobRecord, now_ms: u64) -> u64 {
    if job.rate_per_min == 0 {
        return u64::MAX;
    }
    let elapsed = now_ms.saturating_sub(job.created_ms);
    let due = 1 + u64::from(job.rate_per_min).saturating_mul(elapsed) / 60_000;
    due.saturating_sub(job.started)
}

/// What a running job's tick does once its devices are up to date.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Stop starting devices: aborted by the rule, or completed at the
    /// deadline; the reason.
    Stop(JobStatus, String),
    /// Start this many devices.
    Start(u64),
    /// Nothing to do now.
    Wait,
}

/// Devices one tick starts at most, whatever the rate: a tick is one
/// transaction, and at five ticks a second this still starts 5,000
/// devices a second (a job at rate 0 over a large fleet is spread over
/// ticks instead of holding its lock for one long transaction).
pub const MAX_STARTS_PER_TICK: u64 = 1000;

/// The rules of a tick, in order: the abort rule, the deadline, the rate.
pub fn decide(job: &JobRecord, counts: &Counts, now_ms: u64) -> Decision {
    if let Some(reason) = tripped(job.abort, counts) {
        return Decision::Stop(JobStatus::Aborted, reason);
    }
    if now_ms >= job.deadline_ms {
        return Decision::Stop(JobStatus::Completed, "the deadline passed".into());
    }
    match allowance(job, now_ms)
        .min(counts.queued)
        .min(MAX_STARTS_PER_TICK)
    {
        0 => Decision::Wait,
        n => Decision::Start(n),
    }
}

/// Whether the abort rule trips on these counts; the reason if so.
pub fn tripped(rule: Option<AbortRule>, counts: &Counts) -> Option<String> {
    let rule = rule?;
    let completed = counts.completed();
    let bad = counts.failed + counts.timed_out;
    if completed >= rule.min_completed.max(1)
        && (bad as f64) * 100.0 > rule.failed_pct * completed as f64
    {
        Some(format!(
            "abort rule: {bad} of {completed} completed devices failed or timed out \
             (over {}% of at least {})",
            rule.failed_pct, rule.min_completed
        ))
    } else {
        None
    }
}

/// What a command job's device becomes given its command's state, and
/// whether its command should be cancelled (no answer in time).
pub fn command_outcome(
    cmd: crate::store::CommandState,
    delivered_ms: u64,
    timeout_ms: u64,
    now_ms: u64,
) -> Option<(DeviceState, bool)> {
    use crate::store::CommandState as C;
    Some(match cmd {
        C::Succeeded => (DeviceState::Succeeded, false),
        C::Failed => (DeviceState::Failed, false),
        C::Expired => (DeviceState::TimedOut, false),
        C::Cancelled => (DeviceState::Cancelled, false),
        C::Delivered if now_ms >= delivered_ms.saturating_add(timeout_ms) => {
            (DeviceState::TimedOut, true)
        }
        C::Queued | C::Delivered => return None,
    })
}

/// What a desired-state job's device becomes: succeeded once it confirmed
/// `version` and its reported state holds every member of the patch; timed
/// out past the device timeout after its start once confirmed, or past the
/// deadline if never.
pub fn desired_outcome(
    row: &crate::devices::state::StateRow,
    patch: &str,
    version: u64,
    started_ms: u64,
    job: &JobRecord,
    now_ms: u64,
) -> Option<DeviceState> {
    let acked = row.desired_acked >= version;
    if acked {
        let patch: serde_json::Value = serde_json::from_str(patch).ok()?;
        let reported: serde_json::Value = serde_json::from_str(&row.reported.document).ok()?;
        // What the patch asks for (nulls removed) against what is reported.
        let mut want = serde_json::Value::Object(serde_json::Map::new());
        crate::devices::state::merge_patch(&mut want, &patch);
        let missing = crate::devices::state::delta(&want, &reported);
        if missing.as_object().is_some_and(|m| m.is_empty()) {
            return Some(DeviceState::Succeeded);
        }
        if now_ms >= started_ms.saturating_add(job.device_timeout_ms) {
            return Some(DeviceState::TimedOut);
        }
        return None;
    }
    (now_ms >= job.deadline_ms).then_some(DeviceState::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(rate: u32) -> JobRecord {
        JobRecord {
            id: 1,
            status: JobStatus::Running,
            target: Target::Devices(vec![]),
            operation: Operation::Desired { patch: "{}".into() },
            rate_per_min: rate,
            abort: None,
            device_timeout_ms: 1000,
            deadline_ms: 100_000,
            created_by: "t".into(),
            created_ms: 10_000,
            updated_ms: 10_000,
            finished_ms: None,
            reason: None,
            started: 0,
            counts: Counts::default(),
        }
    }

    #[test]
    fn the_rate_allows_the_first_at_once_then_per_minute() {
        let mut j = job(600);
        assert_eq!(allowance(&j, 10_000), 1);
        assert_eq!(allowance(&j, 10_099), 1);
        assert_eq!(allowance(&j, 10_100), 2);
        assert_eq!(allowance(&j, 20_000), 101);
        j.started = 100;
        assert_eq!(allowance(&j, 20_000), 1);
        j.started = 200;
        assert_eq!(allowance(&j, 20_000), 0);
        assert_eq!(allowance(&job(0), 0), u64::MAX);
    }

    #[test]
    fn a_tick_decides_abort_then_deadline_then_rate_capped() {
        let mut j = job(0);
        let queued = Counts {
            queued: 5000,
            ..Counts::default()
        };
        assert_eq!(
            decide(&j, &queued, 10_000),
            Decision::Start(MAX_STARTS_PER_TICK)
        );
        assert_eq!(
            decide(&j, &Counts::default(), 10_000),
            Decision::Wait,
            "nothing queued"
        );
        assert!(matches!(
            decide(&j, &queued, 100_000),
            Decision::Stop(JobStatus::Completed, _)
        ));
        j.abort = Some(AbortRule {
            failed_pct: 10.0,
            min_completed: 1,
        });
        let bad = Counts {
            failed: 1,
            queued: 5,
            ..Counts::default()
        };
        assert!(matches!(
            decide(&j, &bad, 100_000),
            Decision::Stop(JobStatus::Aborted, _)
        ));
    }

    #[test]
    fn the_abort_rule_waits_for_its_minimum() {
        let rule = Some(AbortRule {
            failed_pct: 5.0,
            min_completed: 20,
        });
        let mut c = Counts {
            succeeded: 17,
            failed: 2,
            ..Counts::default()
        };
        assert!(tripped(rule, &c).is_none(), "19 completed");
        c.succeeded = 18;
        assert!(tripped(rule, &c).is_some(), "2 of 20 is 10%");
        c.succeeded = 38;
        assert!(tripped(rule, &c).is_none(), "2 of 40 is 5%, not over");
        c.timed_out = 1;
        assert!(tripped(rule, &c).is_some(), "3 of 41");
        assert!(tripped(None, &c).is_none());
    }

    #[test]
    fn selectors_and_tags() {
        let s = parse_selector(&["site:north".into(), "model:p7:x".into()]).unwrap();
        assert_eq!(s["site"], "north");
        assert_eq!(s["model"], "p7:x");
        assert!(parse_selector(&["nocolon".into()]).is_err());
        assert!(check_key("a:b").is_err());
        assert!(check_key("").is_err());
        assert!(check_value("k", "bad\u{7}").is_err());
    }
}
