//! Fleet jobs (`jobs`): `POST /v1/jobs` rolls one operation (a command, a
//! desired-state patch or a firmware image) out over a tag selector or a list of devices, at a
//! rate, with an abort rule and a timeout per device; `GET /v1/jobs`,
//! `GET /v1/jobs/{id}` (progress), `GET /v1/jobs/{id}/devices` (each
//! device's state), `POST /v1/jobs/{id}/cancel`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::{ApiError, Json, Query};
use super::ApiState;
use crate::clock::now_ms;
use crate::devices::state::parse_patch;
use crate::jobs::{
    AbortRule, Counts, DeviceState, JobDevice, JobRecord, NewJob, Operation, Target,
};

/// Body of `POST /v1/jobs`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// `{"tags": {"site": "north"}}` (every device with all these tags,
    /// now) or `{"devices": ["pump-1", ...]}`.
    pub target: Target,
    /// `{"command": {"name", "content_type", "payload"}}`,
    /// `{"desired": {...a JSON merge patch of the desired state...}}` or
    /// `{"firmware": {"image": "<id>", "max_downloads": 200}}`.
    #[schema(value_type = Object)]
    pub operation: serde_json::Value,
    /// Devices started per minute (0, the default: all at once).
    #[serde(default)]
    pub rate_per_minute: u32,
    /// Stop when more than `failed_pct` % of at least `min_completed`
    /// completed devices failed or timed out.
    pub abort: Option<AbortRule>,
    /// Seconds a device has once its operation reached it (default 600).
    pub device_timeout_s: Option<u64>,
    /// Seconds until the job ends: devices not reached by then time out
    /// (default 7 days).
    pub deadline_s: Option<u64>,
}

/// A job's operation as shown.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationView {
    /// A command.
    Command {
        /// Its name.
        name: String,
        /// The payload's content type.
        content_type: String,
        /// JSON as JSON, anything else as base64.
        #[schema(value_type = Object)]
        payload: serde_json::Value,
    },
    /// A desired-state patch.
    Desired {
        /// The JSON merge patch.
        #[schema(value_type = Object)]
        patch: serde_json::Value,
    },
    /// A firmware image to install.
    Firmware {
        /// The image's id (hex SHA-256).
        image: String,
        /// The version it installs.
        version: String,
        /// Devices downloading at once per gateway instance.
        max_downloads: u32,
    },
}

/// A job as operators see it.
#[derive(Serialize, ToSchema)]
pub struct JobView {
    /// Its id.
    pub job_id: u64,
    /// running, completed, aborted or cancelled.
    pub status: crate::jobs::JobStatus,
    /// Which devices, as asked.
    pub target: Target,
    /// What it does.
    pub operation: OperationView,
    /// Devices started per minute (0: all at once).
    pub rate_per_minute: u32,
    /// The abort rule.
    pub abort: Option<AbortRule>,
    /// Seconds a device has once reached.
    pub device_timeout_s: u64,
    /// When it ends, Unix ms.
    pub deadline_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
    /// When it stopped starting devices, Unix ms.
    pub finished_ms: Option<u64>,
    /// Why it stopped.
    pub reason: Option<String>,
    /// Devices started.
    pub started: u64,
    /// Devices by state.
    pub counts: Counts,
    /// Every device.
    pub total: u64,
}

impl JobView {
    /// The view of a stored job.
    pub fn of(j: &JobRecord) -> Self {
        Self {
            job_id: j.id,
            status: j.status,
            target: j.target.clone(),
            operation: match &j.operation {
                Operation::Command {
                    name,
                    content_type,
                    payload,
                } => OperationView::Command {
                    name: name.clone(),
                    content_type: crate::envelope::content_type_name(*content_type),
                    payload: crate::envelope::payload_value(*content_type, payload),
                },
                Operation::Desired { patch } => OperationView::Desired {
                    patch: serde_json::from_str(patch).unwrap_or_default(),
                },
                Operation::Firmware {
                    image,
                    version,
                    max_downloads,
                } => OperationView::Firmware {
                    image: image.clone(),
                    version: version.clone(),
                    max_downloads: *max_downloads,
                },
            },
            rate_per_minute: j.rate_per_min,
            abort: j.abort,
            device_timeout_s: j.device_timeout_ms / 1000,
            deadline_ms: j.deadline_ms,
            created_by: j.created_by.clone(),
            created_ms: j.created_ms,
            updated_ms: j.updated_ms,
            finished_ms: j.finished_ms,
            reason: j.reason.clone(),
            started: j.started,
            counts: j.counts,
            total: j.counts.total(),
        }
    }
}

fn operation_of(s: &ApiState, v: serde_json::Value) -> Result<Operation, ApiError> {
    let bad = |m: &str| ApiError::BadRequest(format!("operation: {m}"));
    let serde_json::Value::Object(mut m) = v else {
        return Err(bad(
            "an object with one member, command, desired or firmware",
        ));
    };
    if m.len() != 1 {
        return Err(bad("exactly one of command, desired or firmware"));
    }
    if let Some(c) = m.remove("command") {
        let c: super::commands::CreateCommand = serde_json::from_value(c)
            .map_err(|e| ApiError::BadRequest(format!("operation.command: {e}")))?;
        if c.ttl_s.is_some() {
            return Err(bad(
                "command.ttl_s: a job's command lives until its deadline; use deadline_s and device_timeout_s",
            ));
        }
        if c.name.is_empty() || c.name.len() > 255 {
            return Err(bad("command.name: 1 to 255 bytes"));
        }
        let (content_type, payload) = super::commands::payload_of(&c.content_type, c.payload)?;
        if 8 + 2 + c.name.len() + 1 + payload.len() + 2 > s.max_frame as usize {
            return Err(bad("the command does not fit in limits.max_frame"));
        }
        return Ok(Operation::Command {
            name: c.name,
            content_type,
            payload,
        });
    }
    if let Some(p) = m.remove("desired") {
        let bytes = serde_json::to_vec(&p).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let patch = parse_patch(&bytes, s.state_limits).map_err(|e| {
            if e.is_limit() {
                ApiError::TooLarge(e.to_string())
            } else {
                ApiError::BadRequest(format!("operation.desired: {e}"))
            }
        })?;
        return Ok(Operation::Desired {
            patch: serde_json::Value::Object(patch).to_string(),
        });
    }
    if let Some(f) = m.remove("firmware") {
        let f: FirmwareOp = serde_json::from_value(f)
            .map_err(|e| ApiError::BadRequest(format!("operation.firmware: {e}")))?;
        // The version is the image's, filled in by `create`.
        return Ok(Operation::Firmware {
            image: f.image,
            version: String::new(),
            max_downloads: f.max_downloads.unwrap_or(s.uploads.max_downloads),
        });
    }
    Err(bad("exactly one of command, desired or firmware"))
}

/// `{"firmware": {"image": "<id>", "max_downloads": 50}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FirmwareOp {
    image: String,
    max_downloads: Option<u32>,
}

/// Creates a job; its devices are fixed now and started at its rate.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body = CreateJob,
    responses((status = 201, body = JobView), (status = 400, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody),
              (status = 409, description = "a listed device is revoked", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<CreateJob>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let mut operation = operation_of(&s, body.operation)?;
    if let Operation::Firmware { image, version, .. } = &mut operation {
        let rec = s
            .store
            .firmware(image)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no firmware image {image}")))?;
        *version = rec.version;
    }
    match &body.target {
        Target::Tags(t) => {
            for (k, v) in t {
                crate::jobs::check_key(k).map_err(|e| ApiError::BadRequest(e.to_string()))?;
                crate::jobs::check_value(k, v).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            }
        }
        Target::Devices(d) if d.len() > 100_000 => {
            return Err(ApiError::BadRequest(
                "at most 100,000 listed devices; use a tag selector".into(),
            ))
        }
        Target::Devices(_) => {}
    }
    if let Some(a) = body.abort {
        if !(0.0..=100.0).contains(&a.failed_pct) {
            return Err(ApiError::BadRequest(
                "abort.failed_pct must be 0 to 100".into(),
            ));
        }
    }
    let timeout_s = body.device_timeout_s.unwrap_or(600);
    let deadline_s = body.deadline_s.unwrap_or(7 * 24 * 3600);
    if !(1..=super::commands::MAX_TTL_S).contains(&timeout_s)
        || !(1..=super::commands::MAX_TTL_S).contains(&deadline_s)
    {
        return Err(ApiError::BadRequest(format!(
            "device_timeout_s and deadline_s must be 1 to {}",
            super::commands::MAX_TTL_S
        )));
    }
    let job = s
        .store
        .create_job(NewJob {
            target: body.target,
            operation,
            rate_per_min: body.rate_per_minute,
            abort: body.abort,
            device_timeout_ms: timeout_s * 1000,
            deadline_ms: now_ms().saturating_add(deadline_s * 1000),
            created_by: caller.actor.clone(),
        })
        .await?;
    metrics::counter!("furrow_jobs_created_total").increment(1);
    let view = JobView::of(&job);
    s.events.job(&view);
    let detail = serde_json::json!({ "job_id": job.id, "devices": job.counts.total(),
        "operation": job.operation.kind(), "rate_per_minute": job.rate_per_min });
    super::auth::record(&s, caller.audit("job.create", &job.id.to_string(), detail)).await;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Paging of jobs.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    /// Only jobs with a smaller id.
    pub before: Option<u64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

/// A page of jobs, newest first.
#[derive(Serialize, ToSchema)]
pub struct JobPage {
    /// Jobs, newest first.
    pub jobs: Vec<JobView>,
    /// Pass as `before` for the next page.
    pub next_before: Option<u64>,
}

/// Jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(JobsQuery),
    responses((status = 200, body = JobPage)), security(("bearer" = [])))]
pub async fn list(
    State(s): State<ApiState>,
    Query(q): Query<JobsQuery>,
) -> Result<Json<JobPage>, ApiError> {
    let limit = super::page_limit(q.limit)?;
    let jobs = s.store.jobs(q.before, limit).await?;
    let next_before = (jobs.len() == limit as usize)
        .then(|| jobs.last().map(|j| j.id))
        .flatten();
    Ok(Json(JobPage {
        jobs: jobs.iter().map(JobView::of).collect(),
        next_before,
    }))
}

/// One job and its progress.
#[utoipa::path(get, path = "/v1/jobs/{job_id}", tag = "jobs",
    params(("job_id" = u64, Path)),
    responses((status = 200, body = JobView), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(s): State<ApiState>,
    Path(id): Path<u64>,
) -> Result<Json<JobView>, ApiError> {
    match s.store.job(id).await? {
        Some(j) => Ok(Json(JobView::of(&j))),
        None => Err(ApiError::NotFound(format!("no job {id}"))),
    }
}

/// Paging and filtering of a job's devices.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DevicesQuery {
    /// Only devices in this state.
    pub state: Option<DeviceState>,
    /// Continue after this device id (rollout order).
    pub after: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

/// A page of a job's devices.
#[derive(Serialize, ToSchema)]
pub struct JobDevicePage {
    /// Devices in rollout order.
    pub devices: Vec<JobDevice>,
    /// Pass as `after` for the next page.
    pub next: Option<String>,
}

/// A job's devices and where each one is.
#[utoipa::path(get, path = "/v1/jobs/{job_id}/devices", tag = "jobs",
    params(("job_id" = u64, Path), DevicesQuery),
    responses((status = 200, body = JobDevicePage), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn devices(
    State(s): State<ApiState>,
    Path(id): Path<u64>,
    Query(q): Query<DevicesQuery>,
) -> Result<Json<JobDevicePage>, ApiError> {
    let limit = super::page_limit(q.limit)?;
    if s.store.job(id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no job {id}")));
    }
    let devices = s.store.job_devices(id, q.state, q.after, limit).await?;
    let next = (devices.len() == limit as usize)
        .then(|| devices.last().map(|d| d.device_id.clone()))
        .flatten();
    Ok(Json(JobDevicePage { devices, next }))
}

/// Cancels a running job: nothing more starts; devices whose command has
/// not reached them are cancelled. A stopped job is returned as it is.
#[utoipa::path(post, path = "/v1/jobs/{job_id}/cancel", tag = "jobs",
    params(("job_id" = u64, Path)),
    responses((status = 200, body = JobView), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<u64>,
) -> Result<Json<JobView>, ApiError> {
    let Some(job) = s.store.cancel_job(id, now_ms()).await? else {
        return Err(ApiError::NotFound(format!("no job {id}")));
    };
    let view = JobView::of(&job);
    s.events.job(&view);
    super::auth::record(
        &s,
        caller.audit("job.cancel", &id.to_string(), serde_json::json!({})),
    )
    .await;
    Ok(Json(view))
}
