//! The Lua scripts, one per state transition, sharing one prelude (`common.lua`).
//!
//! Where the server has Redis Functions (7.0 and later) and the user may use them,
//! the transitions are the functions of one library, loaded once with `FUNCTION LOAD`
//! and called with `FCALL`. That is the cheaper form: a script run by `EVALSHA`
//! re-runs its whole top level on every call, so every call paid again for the
//! prelude's forty-odd helper definitions (about 7 µs of Redis's single thread, as
//! much as a whole enqueue's useful work); a library defines them once per load.
//!
//! A server that has no such function (restarted without persistence, a new master,
//! `FUNCTION FLUSH`) answers "Function not found", and the library is loaded again
//! (on every master of a cluster) before the call is retried, as NOSCRIPT is for
//! scripts. A server that knows no `FCALL` (Redis 6, Dragonfly) or a user the ACL
//! denies `FCALL` or `FUNCTION LOAD` gets the same code by `EVALSHA`, the prelude
//! prepended, for the rest of the queue value's life.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};

use redis::{RedisError, Script, ServerErrorKind, ToRedisArgs};
use sha2::{Digest, Sha256};

const COMMON: &str = include_str!("lua/common.lua");

/// One transition: its script, both as a function of the library and stand-alone.
#[derive(Debug)]
pub(crate) struct Transition {
    name: &'static str,
    body: &'static str,
    /// How many of the queue's keys it takes: the first of the layout (see `Keys`).
    pub(crate) keys: usize,
    /// The stand-alone form: the prelude, `begin(KEYS, ARGV)`, then the script.
    script: LazyLock<Script>,
}

macro_rules! transition {
    ($static:ident, $name:literal) => {
        transition!($static, $name, super::keys::KEY_COUNT);
    };
    ($static:ident, $name:literal, $keys:expr) => {
        static $static: Transition = Transition {
            name: $name,
            body: include_str!(concat!("lua/", $name, ".lua")),
            keys: $keys,
            script: LazyLock::new(|| {
                Script::new(concat!(
                    include_str!("lua/common.lua"),
                    "\nbegin(KEYS, ARGV)\n",
                    include_str!(concat!("lua/", $name, ".lua"))
                ))
            }),
        };
    };
}

transition!(ENQUEUE, "enqueue", super::keys::ENQUEUE_KEYS);
transition!(CLAIM, "claim");
transition!(REPORT, "report");
transition!(RELEASE, "release");
transition!(HEARTBEAT, "heartbeat");
transition!(PROGRESS, "progress");
transition!(CANCEL, "cancel");
transition!(UNREGISTER, "unregister");
transition!(BREAKER, "breaker");
transition!(REQUEUE, "requeue");
transition!(PURGE, "purge");

static ALL: [&Transition; 11] = [
    &ENQUEUE,
    &CLAIM,
    &REPORT,
    &RELEASE,
    &HEARTBEAT,
    &PROGRESS,
    &CANCEL,
    &UNREGISTER,
    &BREAKER,
    &REQUEUE,
    &PURGE,
];

/// The library: its code, and the prefix of its function names. Both carry a digest
/// of the scripts, so two versions of voxqueue on one server never replace each
/// other's functions (an old version's library stays until `FUNCTION DELETE`).
struct Library {
    code: String,
    prefix: String,
}

static LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    let mut digest = Sha256::new();
    digest.update(COMMON);
    for t in ALL {
        digest.update(t.name);
        digest.update(t.body);
    }
    let version: String = digest.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let prefix = format!("voxqueue_{version}");
    // KEYS and ARGV are the library's own locals, bound per call, so each script's
    // lines read the same in both forms.
    let mut code = format!("#!lua name={prefix}\nlocal KEYS, ARGV\n{COMMON}\n");
    for t in ALL {
        code.push_str(&format!(
            "redis.register_function('{prefix}_{name}', function(keys, args)\n\
             KEYS, ARGV = keys, args\nbegin(keys, args)\n{body}\nend)\n",
            name = t.name,
            body = t.body,
        ));
    }
    Library { code, prefix }
});

/// The transitions, and how this queue value's server runs them.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) enqueue: &'static Transition,
    pub(crate) claim: &'static Transition,
    pub(crate) report: &'static Transition,
    pub(crate) release: &'static Transition,
    pub(crate) heartbeat: &'static Transition,
    pub(crate) progress: &'static Transition,
    pub(crate) cancel: &'static Transition,
    pub(crate) unregister: &'static Transition,
    pub(crate) breaker: &'static Transition,
    pub(crate) requeue: &'static Transition,
    pub(crate) purge: &'static Transition,
    /// Set once the server showed it cannot run functions for this queue value.
    evalsha: AtomicBool,
}

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
            evalsha: AtomicBool::new(false),
        }
    }

    /// Whether calls go by `FCALL` (until the server showed it cannot).
    pub(crate) fn functions(&self) -> bool {
        !self.evalsha.load(Ordering::Relaxed)
    }

    /// From now on this queue value calls its scripts by `EVALSHA`.
    pub(crate) fn functions_unavailable(&self, why: &RedisError) {
        if !self.evalsha.swap(true, Ordering::Relaxed) {
            tracing::info!(reason = %why, "Redis Functions unavailable; scripts run by EVALSHA");
        }
    }
}

impl Transition {
    /// The stand-alone script (`EVALSHA`).
    pub(crate) fn script(&self) -> &Script {
        &self.script
    }

    /// The `FCALL` command for this transition with `keys` and `args`.
    pub(crate) fn fcall(&self, keys: &[String], args: &[Vec<u8>]) -> redis::Cmd {
        call(
            "FCALL",
            &format!("{}_{}", LIBRARY.prefix, self.name),
            keys,
            args,
        )
    }

    /// The `EVALSHA` command of the stand-alone script with `keys` and `args`. It does
    /// not load the script on NOSCRIPT (`script()`'s invocation does): for pipelines,
    /// which load it themselves.
    pub(crate) fn evalsha(&self, keys: &[String], args: &[Vec<u8>]) -> redis::Cmd {
        call("EVALSHA", self.script.get_hash(), keys, args)
    }
}

/// `FCALL` and `EVALSHA` share their shape: what to run, the key count, keys, arguments.
fn call(verb: &str, target: &str, keys: &[String], args: &[Vec<u8>]) -> redis::Cmd {
    let mut cmd = redis::cmd(verb);
    cmd.arg(target).arg(keys.len());
    for key in keys {
        cmd.arg(key);
    }
    for arg in args {
        cmd.arg(arg.as_slice());
    }
    cmd
}

/// `FUNCTION LOAD REPLACE` of the library (a cluster client sends it to every master).
pub(crate) fn load_library() -> redis::Cmd {
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LOAD").arg("REPLACE").arg(LIBRARY.code.as_str());
    cmd
}

/// The server has no such function (yet): load the library and call again.
pub(crate) fn is_function_missing(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(ServerErrorKind::ResponseError)
        && e.detail()
            .is_some_and(|d| d.starts_with("Function not found"))
}

/// The server cannot or may not run functions: fall back to scripts. Redis answers
/// an unknown command (Redis 6, Dragonfly) and an ACL refusal only in words.
pub(crate) fn is_functions_unavailable(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoPerm)
        || (e.kind() == redis::ErrorKind::Server(ServerErrorKind::ResponseError)
            && e.detail().is_some_and(|d| {
                let d = d.to_ascii_lowercase();
                d.starts_with("unknown command") || d.contains("unknown subcommand")
            }))
}

/// Writes one argument the way `ScriptInvocation::arg` does.
pub(crate) fn push_arg<T: ToRedisArgs>(args: &mut Vec<Vec<u8>>, arg: T) {
    arg.write_redis_args(args);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transition_is_a_function_of_one_versioned_library() {
        let lib = &LIBRARY;
        assert!(
            lib.code
                .starts_with(&format!("#!lua name={}\n", lib.prefix))
        );
        for t in ALL {
            let name = format!("'{}_{}'", lib.prefix, t.name);
            assert_eq!(lib.code.matches(&name).count(), 1, "{name}");
        }
        assert_eq!(lib.prefix.len(), "voxqueue_".len() + 12);
    }

    /// The error a server answers with `line` (`-CODE detail`).
    fn answered(line: &str) -> RedisError {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .and_then(redis::Value::extract_error)
            .expect_err("an error reply")
    }

    #[test]
    fn a_missing_function_is_told_by_its_text() {
        assert!(is_function_missing(&answered("ERR Function not found")));
        assert!(!is_function_missing(&answered(
            "ERR unknown command 'FCALL'"
        )));
        // The same words under another code are not this answer.
        assert!(!is_function_missing(&answered("NOPERM Function not found")));
        assert!(!is_function_missing(&answered(
            "NOSCRIPT No matching script"
        )));
    }

    #[test]
    fn functions_are_unavailable_on_old_servers_and_to_refused_users() {
        for line in [
            "ERR unknown command 'FCALL', with args beginning with: ",
            "ERR Unknown Command 'fcall'",
            "ERR unknown subcommand 'LOAD'. Try FUNCTION HELP.",
            "NOPERM this user has no permissions to run the 'fcall' command",
        ] {
            assert!(is_functions_unavailable(&answered(line)), "{line}");
        }
        for line in [
            "ERR Function not found",
            "ERR wrong number of arguments",
            "NOSCRIPT unknown command",
            "LOADING unknown subcommand",
        ] {
            assert!(!is_functions_unavailable(&answered(line)), "{line}");
        }
    }

    #[test]
    fn a_queue_value_falls_back_to_scripts_once_and_for_good() {
        let scripts = Scripts::get();
        assert!(scripts.functions());
        scripts.functions_unavailable(&answered("ERR unknown command 'FCALL'"));
        assert!(!scripts.functions());
        scripts.functions_unavailable(&answered("ERR unknown command 'FCALL'"));
        assert!(!scripts.functions());
    }
}
