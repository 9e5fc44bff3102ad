//! Errors: [`Error`] for what the queue and worker report to their caller, [`JobError`]
//! for what a handler reports about one attempt.

use std::time::Duration;

use crate::job::{JobId, JobState};

/// What went wrong talking to the queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Redis URL or cluster configuration was refused, or the first connection failed.
    #[error("cannot connect to Redis: {0}")]
    Connect(#[source] redis::RedisError),
    /// A command or script failed (server error, lost connection, response timeout).
    #[error("Redis error: {0}")]
    Redis(#[source] redis::RedisError),
    /// Redis refused the credentials: a wrong password, or a user that does not exist
    /// or is switched off. Redis says no more (it never tells a client which).
    #[error(
        "Redis refused the credentials{}: wrong password, or no such user, or the user is off \
         (ACL SETUSER <user> on >password)",
        user.as_deref().map(|u| format!(" of user {u:?}")).unwrap_or_default()
    )]
    AuthFailed {
        /// The user named in the URL (`None`: the `default` user).
        user: Option<String>,
    },
    /// The Redis ACL user may not do something voxqueue needs: `missing` says what, as
    /// far as Redis told. The message lists every rule voxqueue needs
    /// ([`acl_rules`](crate::acl_rules), the README's `ACL SETUSER` line).
    #[error(
        "Redis ACL refused {missing}. The user needs: {rules} (README, \"Least privilege\"); \
         ACL LOG on the server names the exact command or key. Redis said: {server}",
        rules = crate::acl_rules("<prefix>")
    )]
    NoPermission {
        /// What was refused.
        missing: AclMissing,
        /// Redis's own words.
        server: String,
    },
    /// Queue names become part of every key and its hash tag.
    #[error(
        "invalid queue name {0:?}: it must be 1 to 128 characters without '{{', '}}', ':' or whitespace"
    )]
    InvalidQueueName(String),
    /// The key prefix may not carry a hash tag of its own.
    #[error("invalid key prefix {0:?}: it must be non-empty without '{{', '}}' or whitespace")]
    InvalidPrefix(String),
    /// Caller-chosen ids must be printable and short.
    #[error("invalid job id {0:?}: it must be 1 to 256 characters without control characters")]
    InvalidJobId(String),
    /// The queue's validator refused the job; nothing was enqueued.
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// A builder was given a value it cannot work with.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The job could not be serialised to JSON.
    #[error("cannot serialise job: {0}")]
    Serialize(#[source] serde_json::Error),
    /// Something stored in Redis could not be read back (a corrupt record or result).
    #[error("corrupt data in Redis for job {id}: {reason}")]
    Corrupt {
        /// The job whose data is unreadable.
        id: JobId,
        /// What failed to parse.
        reason: String,
    },
    /// A script answered with something this version does not understand.
    #[error("unexpected reply from Redis: {0}")]
    Protocol(String),
    /// No job with this id exists (never enqueued, or swept after its retention).
    #[error("job {0} not found")]
    NotFound(JobId),
    /// The rate limit for `key` is spent; nothing was enqueued.
    #[error("rate limit for {key:?} reached; retry after {retry_after:?}")]
    RateLimited {
        /// The rate-limit key (an API key, a tenant).
        key: String,
        /// When the same enqueue would be allowed.
        retry_after: Duration,
    },
    /// The job **is stored** on the primary, but fewer replicas than asked
    /// ([`Enqueue::wait_for_replicas`](crate::Enqueue::wait_for_replicas)) confirmed
    /// it within the timeout: a failover before they catch up could lose it. Enqueueing
    /// again with the same id is safe (it returns this job) and waits again.
    #[error(
        "job {id} is stored on the primary, but only {acked} of {wanted} replicas confirmed it within {timeout:?}"
    )]
    ReplicasNotAcked {
        /// The job (stored on the primary).
        id: JobId,
        /// Replicas that confirmed the write.
        acked: u32,
        /// Replicas asked for.
        wanted: u32,
        /// How long the enqueue waited.
        timeout: Duration,
    },
    /// A partitioned queue exists with another partition count than the one asked
    /// for: its jobs are spread by that count, so it cannot be opened with another.
    #[error("queue {queue:?} has {stored} partitions, not {requested}")]
    PartitionMismatch {
        /// The logical queue.
        queue: String,
        /// The count stored in Redis when the queue was created.
        stored: u32,
        /// The count this caller asked for.
        requested: u32,
    },
    /// The job did not finish within the time the caller was willing to wait.
    #[error("timed out waiting for job {0}")]
    WaitTimeout(JobId),
    /// The job finished, but not with a result.
    #[error("job {id} ended {state}{}", last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    JobFailed {
        /// The job.
        id: JobId,
        /// Its terminal state (dead, cancelled or expired).
        state: JobState,
        /// The last recorded error, if any.
        last_error: Option<String>,
    },
}

/// What a Redis ACL refused, as far as Redis says: a command outside a script is
/// named; a key, or a command inside one of voxqueue's scripts, is not.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AclMissing {
    /// The command (or `command|subcommand`) Redis named: add `+<it>` to the user.
    Command(String),
    /// A key outside the user's key patterns. Redis does not say which; all of a
    /// queue's keys start with its prefix, so the user needs `~<prefix>:*`.
    Key,
    /// A command inside one of voxqueue's Lua scripts. Redis names only the script
    /// (its SHA and line); every command in the rules below is needed.
    ScriptCommand,
}

impl std::fmt::Display for AclMissing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AclMissing::Command(c) => write!(f, "the command {c:?}: add +{c}"),
            AclMissing::Key => f.write_str(
                "a key outside the user's key patterns (Redis does not say which; \
                 the queue's keys are <prefix>:*)",
            ),
            AclMissing::ScriptCommand => {
                f.write_str("a command inside a voxqueue script (Redis does not say which)")
            }
        }
    }
}

impl From<redis::RedisError> for Error {
    /// Sorts Redis's refusals into typed errors: ACL refusals and rejected credentials
    /// come only as text from the server, so this is the one place that reads it.
    fn from(e: redis::RedisError) -> Self {
        classify(e).unwrap_or_else(Error::Redis)
    }
}

/// An ACL or authentication refusal as its typed error; anything else back unchanged.
pub(crate) fn classify(e: redis::RedisError) -> Result<Error, redis::RedisError> {
    if e.kind() == redis::ErrorKind::AuthenticationFailed || e.code() == Some("WRONGPASS") {
        return Ok(Error::AuthFailed { user: None });
    }
    let text = e.detail().map_or_else(|| e.to_string(), str::to_owned);
    let missing = if e.code() == Some("NOPERM") {
        // "this user has no permissions to run the 'evalsha' command"
        match text.split('\'').nth(1) {
            Some(command) if text.contains("to run the") => AclMissing::Command(command.to_owned()),
            _ if text.contains("keys") => AclMissing::Key,
            _ => return Err(e),
        }
    } else if text.contains("The user executing the script can't run this command") {
        AclMissing::ScriptCommand
    } else if text.contains("The user executing the script can't access") {
        AclMissing::Key
    } else {
        return Err(e);
    };
    Ok(Error::NoPermission {
        missing,
        server: text,
    })
}

impl Error {
    /// Whether the failure was the connection's (worth retrying the same call later),
    /// as opposed to bad input or bad data.
    pub fn is_connection_error(&self) -> bool {
        match self {
            Error::Connect(_) => true,
            Error::Redis(e) => e.is_io_error() || e.is_timeout() || e.is_connection_dropped(),
            _ => false,
        }
    }

    /// Whether the same call may succeed if tried again later: the connection's
    /// failures ([`Error::is_connection_error`]) and the server's passing states — a
    /// restarted server still loading its data (`LOADING`), a cluster resharding or
    /// failing over (`TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `READONLY` on a demoted
    /// primary, no primary named by the sentinels yet), or a server busy with a long
    /// script (`BUSY`). Workers retry these;
    /// they never count as a job's failure.
    pub fn is_transient(&self) -> bool {
        if self.is_connection_error() {
            return true;
        }
        match self {
            // During a Sentinel failover the sentinels may, for a moment, name no
            // reachable primary (at first connect this is more likely a wrong name).
            Error::Redis(e) if e.kind() == redis::ErrorKind::MasterNameNotFoundBySentinel => true,
            Error::Redis(e) => matches!(
                e.code(),
                Some("LOADING" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY" | "BUSY")
            ),
            _ => false,
        }
    }

    /// Whether waiting timed out (the job may still finish).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::WaitTimeout(_))
    }
}

/// Why one attempt of a job failed; the kind decides what happens next.
///
/// Retry code asks [`JobError::is_retryable`], never the message text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// May pass on another attempt (a busy GPU, a network blip): retried while the
    /// job has attempts left.
    #[error("{0}")]
    Transient(String),
    /// Will fail again whatever we do (bad input): the job goes to the dead letters.
    #[error("{0}")]
    Permanent(String),
    /// Transient, and the handler knows when to try again (a rate-limited upstream).
    #[error("{message} (retry after {after:?})")]
    RetryAfter {
        /// What happened.
        message: String,
        /// How long to wait before the next attempt, overriding the retry policy.
        after: Duration,
    },
    /// The handler stopped because its cancellation token fired.
    #[error("cancelled")]
    Cancelled,
    /// The attempt outlived its timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The handler panicked; the message is the panic's.
    #[error("handler panicked: {0}")]
    Panic(String),
    /// The payload in Redis does not decode as the worker's job type.
    #[error("payload does not decode: {0}")]
    Decode(String),
}

impl JobError {
    /// A failure that may pass on another attempt.
    pub fn transient(message: impl std::fmt::Display) -> Self {
        JobError::Transient(message.to_string())
    }

    /// A failure that no retry will fix.
    pub fn permanent(message: impl std::fmt::Display) -> Self {
        JobError::Permanent(message.to_string())
    }

    /// A transient failure with a known time to wait.
    pub fn retry_after(message: impl std::fmt::Display, after: Duration) -> Self {
        JobError::RetryAfter {
            message: message.to_string(),
            after,
        }
    }

    /// Whether another attempt may succeed. Timeouts and panics count as transient:
    /// both are often caused by load rather than by the job.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            JobError::Transient(_)
                | JobError::RetryAfter { .. }
                | JobError::Timeout(_)
                | JobError::Panic(_)
        )
    }

    /// The delay the handler asked for, overriding the retry policy.
    pub fn retry_delay(&self) -> Option<Duration> {
        match self {
            JobError::RetryAfter { after, .. } => Some(*after),
            _ => None,
        }
    }

    /// A short stable name for the kind, stored with the error history.
    pub fn kind(&self) -> &'static str {
        match self {
            JobError::Transient(_) => "transient",
            JobError::Permanent(_) => "permanent",
            JobError::RetryAfter { .. } => "retry_after",
            JobError::Cancelled => "cancelled",
            JobError::Timeout(_) => "timeout",
            JobError::Panic(_) => "panic",
            JobError::Decode(_) => "decode",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> Error {
        Error::Redis(redis::make_extension_error(code.to_owned(), None))
    }

    #[test]
    fn passing_server_states_are_transient_and_real_errors_are_not() {
        for code in [
            "LOADING",
            "TRYAGAIN",
            "CLUSTERDOWN",
            "MASTERDOWN",
            "READONLY",
            "BUSY",
        ] {
            assert!(server(code).is_transient(), "{code}");
        }
        for code in ["ERR", "WRONGTYPE", "NOPERM", "NOSCRIPT"] {
            assert!(!server(code).is_transient(), "{code}");
        }
        assert!(!Error::Protocol("x".into()).is_transient());
    }

    #[test]
    fn a_lost_connection_and_a_missing_primary_are_transient() {
        let io = || redis::RedisError::from(std::io::Error::other("gone"));
        assert!(Error::Connect(io()).is_connection_error());
        assert!(Error::Connect(io()).is_transient());
        assert!(Error::Redis(io()).is_connection_error());
        assert!(Error::Redis(io()).is_transient());
        assert!(!server("LOADING").is_connection_error());
        assert!(!Error::Protocol("x".into()).is_connection_error());
        let no_primary = Error::Redis(redis::RedisError::from((
            redis::ErrorKind::MasterNameNotFoundBySentinel,
            "no primary",
        )));
        assert!(no_primary.is_transient());
        assert!(!no_primary.is_connection_error());
    }

    #[test]
    fn only_a_wait_that_ran_out_is_a_timeout() {
        let id = JobId::new("a").unwrap();
        assert!(Error::WaitTimeout(id.clone()).is_timeout());
        assert!(!Error::NotFound(id).is_timeout());
        assert!(!server("LOADING").is_timeout());
    }

    fn refused(code: &str, detail: &str) -> Error {
        Error::from(redis::make_extension_error(
            code.to_owned(),
            Some(detail.to_owned()),
        ))
    }

    #[test]
    fn acl_refusals_say_what_is_missing() {
        let missing = |e: Error| match e {
            Error::NoPermission { missing, .. } => missing,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            missing(refused(
                "NOPERM",
                "this user has no permissions to run the 'script|load' command"
            )),
            AclMissing::Command("script|load".into())
        );
        assert_eq!(
            missing(refused(
                "NOPERM",
                "this user has no permissions to access one of the keys used as arguments"
            )),
            AclMissing::Key
        );
        assert_eq!(
            missing(refused(
                "ERR",
                "The user executing the script can't run this command or subcommand script: abc, on @user_script:12."
            )),
            AclMissing::ScriptCommand
        );
        assert!(matches!(
            refused(
                "WRONGPASS",
                "invalid username-password pair or user is disabled."
            ),
            Error::AuthFailed { user: None }
        ));
        // Other refusals and errors stay what they were.
        assert!(matches!(
            refused(
                "NOPERM",
                "this user has no permissions to access one of the channels"
            ),
            Error::Redis(_)
        ));
        assert!(matches!(refused("ERR", "unknown command"), Error::Redis(_)));
        assert!(!refused("NOPERM", "no permissions to run the 'get' command").is_transient());
    }
}
