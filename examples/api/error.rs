//! Errors as the API answers them.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use voxqueue::tts::CatalogError;
use voxqueue::{JobId, JobState};

/// An error response: `{ "error": { "code", "message" } }`, plus `state` where the
/// job's state is the answer (409) and `Retry-After` on 429. Codes are stable; messages
/// are for people.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) state: Option<JobState>,
    pub(crate) retry_after: Option<Duration>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            state: None,
            retry_after: None,
        }
    }

    pub(crate) fn not_found(id: &JobId) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("no job {id}"))
    }

    pub(crate) fn internal(what: &str, error: impl std::fmt::Display) -> Self {
        // The detail goes to the log, not to the caller.
        tracing::error!(error = %error, "{what}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", what)
    }
}

impl From<voxqueue::Error> for ApiError {
    fn from(e: voxqueue::Error) -> Self {
        use voxqueue::Error as E;
        match e {
            E::InvalidJob(message) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
            }
            E::NotFound(id) => Self::not_found(&id),
            E::RateLimited { retry_after, .. } => Self::rate_limited(
                "too many new jobs for this API key; retry later",
                retry_after,
            ),
            e if e.is_connection_error() => Self::unavailable(e),
            e => Self::internal("queue error", e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(state) = self.state {
            error["state"] = json!(state);
        }
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: retrying on the dot of a rounded-down value
            // would be refused again.
            let secs = after.as_millis().div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
        }
        response
    }
}

/// Ids come from the path: one that cannot be a job id names no job.
pub(crate) fn job_id(raw: &str) -> Result<JobId, ApiError> {
    JobId::new(raw).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job {raw:?}"),
        )
    })
}

impl ApiError {
    /// 422: the request is well-formed but cannot be done.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    /// 409: the job is not completed (yet, or ever), with its state.
    pub(crate) fn not_completed(id: &JobId, state: JobState) -> Self {
        ApiError {
            state: Some(state),
            ..Self::new(
                StatusCode::CONFLICT,
                "not_completed",
                format!("job {id} is {state}"),
            )
        }
    }

    /// 400: the request is malformed.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 429 with `Retry-After`.
    pub(crate) fn rate_limited(message: &str, retry_after: Duration) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }

    fn unavailable(error: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %error, "Redis unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the queue is unavailable; retry later",
        )
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Invalid { .. } => Self::invalid(e.to_string()),
            e if e.is_connection_error() => Self::unavailable(e),
            e => Self::internal("voice catalogue error", e),
        }
    }
}

/// A body that is not the JSON a route takes.
pub(crate) fn json_rejection(rejection: JsonRejection) -> ApiError {
    let (status, code) = match &rejection {
        JsonRejection::JsonDataError(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        JsonRejection::MissingJsonContentType(_) => {
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
        }
        _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        }
        _ => (StatusCode::BAD_REQUEST, "bad_request"),
    };
    ApiError::new(status, code, rejection.body_text())
}
