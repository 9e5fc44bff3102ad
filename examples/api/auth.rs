//! Who may call what: API keys, admin keys and the metrics token, each checked by its
//! sha256 digest; read rate limits per caller.

use std::collections::HashMap;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Submit and read jobs.
    User,
    /// Also the dashboard, custom voices, dead letters and stats.
    Admin,
}

/// Accepted keys, by sha256 digest. Looking a key up by its digest takes the same time
/// whichever byte differs, and the digest (not the key) names the caller in Redis
/// rate-limit keys and logs.
#[derive(Debug, Default)]
pub(crate) struct ApiKeys {
    by_digest: HashMap<[u8; 32], (String, Role)>,
    metrics: Option<[u8; 32]>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ApiKeys {
    pub(crate) fn new(keys: &[String], admin: &[String], metrics: Option<&str>) -> Self {
        let named = |keys: &[String], role: Role| {
            keys.iter()
                .map(|k| k.trim())
                .filter(|k| !k.is_empty())
                .map(|k| {
                    let d = digest(k);
                    (d, (format!("key-{}", hex(&d[..6])), role))
                })
                .collect::<Vec<_>>()
        };
        let mut by_digest: HashMap<_, _> = named(keys, Role::User).into_iter().collect();
        by_digest.extend(named(admin, Role::Admin));
        ApiKeys {
            by_digest,
            metrics: metrics.map(str::trim).filter(|m| !m.is_empty()).map(digest),
        }
    }

    /// No keys at all: everything is open.
    pub(crate) fn is_open(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The caller's name and role if `token` is an accepted key.
    fn check(&self, token: &str) -> Option<&(String, Role)> {
        self.by_digest.get(&digest(token))
    }
}

/// Who made a request: the key's name (or `anonymous` on an open API) and its role.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) name: String,
    pub(crate) role: Role,
}

/// The token a request carries: `Authorization: Bearer <key>`, or the dashboard's
/// `vq_key` cookie (a browser sends it with `<audio src>` and `EventSource`, which
/// cannot set headers).
fn token(headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    bearer.or_else(|| {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix("vq_key="))
            .map(|t| percent_decode(t.trim()))
            .next()
    })
}

/// The login page stores the key with `encodeURIComponent`.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unauthorized(message: &str) -> Response {
    let mut e = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    e.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    e
}

/// The caller of a request, if its key is accepted (everyone on an open API).
pub(crate) fn caller(state: &AppState, headers: &HeaderMap) -> Option<Caller> {
    if state.keys.is_open() {
        return Some(Caller {
            name: "anonymous".to_owned(),
            role: Role::Admin,
        });
    }
    let token = token(headers)?;
    state.keys.check(&token).map(|(name, role)| Caller {
        name: name.clone(),
        role: *role,
    })
}

/// Checks the key, records the caller, and applies the read rate limit to GETs.
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(caller) = caller(&state, request.headers()) else {
        return unauthorized("send a valid API key as `Authorization: Bearer <key>`");
    };
    if let Some(rate) = state.config.read_rate
        && matches!(*request.method(), Method::GET | Method::HEAD)
        && let Err(wait) = state.reads.check(&caller.name, rate)
    {
        return ApiError::rate_limited("too many reads for this API key; retry later", wait)
            .into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Admin routes: an admin key (any caller on an open API).
pub(crate) async fn require_admin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match caller(&state, request.headers()) {
        Some(c) if c.role == Role::Admin => next.run(request).await,
        Some(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this route needs an admin key",
        )
        .into_response(),
        None => unauthorized("send a valid admin key as `Authorization: Bearer <key>`"),
    }
}

/// `/metrics`: open on an open API; else the metrics token or an admin key.
pub(crate) async fn metrics_auth(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let token = token(request.headers());
    let allowed = state.keys.is_open()
        || token.as_deref().is_some_and(|t| {
            state.keys.metrics == Some(digest(t))
                || state.keys.check(t).is_some_and(|(_, r)| *r == Role::Admin)
        });
    if allowed {
        next.run(request).await
    } else {
        unauthorized("send the metrics token as `Authorization: Bearer <token>`")
    }
}
