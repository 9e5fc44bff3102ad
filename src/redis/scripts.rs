//! The Lua scripts, one per state transition, each prefixed with the shared prelude.
//!
//! Scripts are invoked by SHA; `Script::invoke_async` loads a script again when a
//! restarted Redis answers NOSCRIPT, so no call path depends on a warm script cache.

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| Script::new(concat!(include_str!("lua/common.lua"), include_str!($file))))
    };
}

/// The compiled scripts, shared by every queue (the SHA does not depend on keys).
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) enqueue: &'static Script,
    pub(crate) claim: &'static Script,
    pub(crate) report: &'static Script,
    pub(crate) release: &'static Script,
    pub(crate) heartbeat: &'static Script,
    pub(crate) progress: &'static Script,
    pub(crate) cancel: &'static Script,
    pub(crate) unregister: &'static Script,
    pub(crate) breaker: &'static Script,
    pub(crate) requeue: &'static Script,
    pub(crate) purge: &'static Script,
}

static ENQUEUE: LazyLock<Script> = script!("lua/enqueue.lua");
static CLAIM: LazyLock<Script> = script!("lua/claim.lua");
static REPORT: LazyLock<Script> = script!("lua/report.lua");
static RELEASE: LazyLock<Script> = script!("lua/release.lua");
static HEARTBEAT: LazyLock<Script> = script!("lua/heartbeat.lua");
static PROGRESS: LazyLock<Script> = script!("lua/progress.lua");
static CANCEL: LazyLock<Script> = script!("lua/cancel.lua");
static UNREGISTER: LazyLock<Script> = script!("lua/unregister.lua");
static BREAKER: LazyLock<Script> = script!("lua/breaker.lua");
static REQUEUE: LazyLock<Script> = script!("lua/requeue.lua");
static PURGE: LazyLock<Script> = script!("lua/purge.lua");

impl Scripts {
    pub(crate) fn get() -> Self {
        Self {
            enqueue: &ENQUEUE,
            claim: &CLAIM,
            report: &REPORT,
            release: &RELEASE,
            heartbeat: &HEARTBEAT,
            progress: &PROGRESS,
            cancel: &CANCEL,
            unregister: &UNREGISTER,
            breaker: &BREAKER,
            requeue: &REQUEUE,
            purge: &PURGE,
        }
    }
}
