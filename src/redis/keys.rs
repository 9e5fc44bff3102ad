//! The key layout of one queue.
//!
//! Every key of a queue carries the queue name as its hash tag, `<prefix>:{<queue>}:...`,
//! so each script touches one slot and the same code runs on Redis Cluster.

use crate::error::Error;
use crate::job::Priority;

/// The keys of one queue, in the order every script receives them (see `lua/common.lua`).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    base: String,
    all: [String; KEY_COUNT],
}

/// How many keys a queue has: what every script but enqueue takes.
pub(crate) const KEY_COUNT: usize = 22;

const NAMES: [&str; KEY_COUNT] = [
    // What enqueue uses, first: it is passed these alone (see `ENQUEUE_KEYS`).
    "jobs",
    "ready:high",
    "ready:normal",
    "ready:low",
    "scheduled",
    "events",
    "wake",
    "stats",
    "dedup",
    "dedup_exp",
    "limits",
    "limits_exp",
    // The rest, for the scripts of a job's later life and of maintenance.
    "payloads",
    "results",
    "leases",
    // The sorted set that held ready jobs before the lanes (one list per priority,
    // above); claims still drain it.
    "ready",
    "active",
    "dead",
    "finished",
    "workers",
    "seq",
    "breakers",
];

/// How many keys enqueue takes: the first of the layout. Redis 7.0 builds a script's
/// KEYS table by growing it one key at a time, each key a Lua string: the ten keys an
/// enqueue never touches were a twentieth of a one-by-one enqueue's instructions.
pub(crate) const ENQUEUE_KEYS: usize = 12;

impl Keys {
    /// Builds the layout after checking the names: a `{`, `}` or `:` in a queue name
    /// would break the hash tag or make two queues' keys collide.
    pub(crate) fn new(prefix: &str, queue: &str) -> Result<Self, Error> {
        validate_queue_name(queue)?;
        if prefix.is_empty()
            || prefix.contains(['{', '}'])
            || prefix.chars().any(char::is_whitespace)
        {
            return Err(Error::InvalidPrefix(prefix.to_owned()));
        }
        let base = format!("{prefix}:{{{queue}}}");
        let all = NAMES.map(|name| format!("{base}:{name}"));
        Ok(Self { base, all })
    }

    /// All keys, for a script invocation.
    pub(crate) fn all(&self) -> &[String; KEY_COUNT] {
        &self.all
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn jobs(&self) -> &str {
        &self.all[0]
    }
    pub(crate) fn payloads(&self) -> &str {
        &self.all[12]
    }
    pub(crate) fn results(&self) -> &str {
        &self.all[13]
    }
    /// The sorted set of ready jobs from before the lanes (read, drained, never filled).
    pub(crate) fn ready(&self) -> &str {
        &self.all[15]
    }
    /// The ready list of one priority.
    pub(crate) fn lane(&self, priority: Priority) -> &str {
        &self.all[1 + usize::from(priority.rank())]
    }
    pub(crate) fn scheduled(&self) -> &str {
        &self.all[4]
    }
    pub(crate) fn active(&self) -> &str {
        &self.all[16]
    }
    pub(crate) fn dead(&self) -> &str {
        &self.all[17]
    }
    pub(crate) fn events(&self) -> &str {
        &self.all[5]
    }
    pub(crate) fn wake(&self) -> &str {
        &self.all[6]
    }
    pub(crate) fn workers(&self) -> &str {
        &self.all[19]
    }
    pub(crate) fn stats(&self) -> &str {
        &self.all[7]
    }
    #[cfg(test)]
    pub(crate) fn dedup(&self) -> &str {
        &self.all[8]
    }
    pub(crate) fn breakers(&self) -> &str {
        &self.all[21]
    }
}

/// Checks a queue name: non-empty, at most 128 characters, and none of `{`, `}`, `:`
/// or whitespace.
pub(crate) fn validate_queue_name(name: &str) -> Result<(), Error> {
    let bad = name.is_empty()
        || name.len() > 128
        || name
            .chars()
            .any(|c| matches!(c, '{' | '}' | ':') || c.is_whitespace() || c.is_control());
    if bad {
        return Err(Error::InvalidQueueName(name.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_queue_hash_tag() {
        let keys = Keys::new("vq", "synthesis").unwrap();
        assert_eq!(keys.jobs(), "vq:{synthesis}:jobs");
        assert!(keys.all().iter().all(|k| k.starts_with("vq:{synthesis}:")));
    }

    #[test]
    fn bad_queue_names_are_rejected() {
        for name in ["", "a{b", "a}b", "a:b", "a b", &"x".repeat(129)] {
            assert!(
                matches!(Keys::new("vq", name), Err(Error::InvalidQueueName(_))),
                "{name}"
            );
        }
        assert!(matches!(
            Keys::new("v{q", "ok"),
            Err(Error::InvalidPrefix(_))
        ));
        for prefix in ["", "v}q", "v q", "v\tq"] {
            assert!(
                matches!(Keys::new(prefix, "ok"), Err(Error::InvalidPrefix(_))),
                "{prefix:?}"
            );
        }
        assert!(matches!(
            Keys::new("vq", "a\u{7}b"),
            Err(Error::InvalidQueueName(_))
        ));
    }

    #[test]
    fn names_up_to_128_characters_and_odd_prefixes_are_accepted() {
        let long = "x".repeat(128);
        assert!(Keys::new("vq", &long).is_ok());
        let keys = Keys::new("app:v1", "tts-en_US.2").unwrap();
        assert_eq!(keys.base(), "app:v1:{tts-en_US.2}");
    }

    #[test]
    fn each_key_has_the_name_the_scripts_expect() {
        let keys = Keys::new("p", "q").unwrap();
        let named = [
            (keys.jobs(), "jobs"),
            (keys.payloads(), "payloads"),
            (keys.results(), "results"),
            (keys.ready(), "ready"),
            (keys.scheduled(), "scheduled"),
            (keys.active(), "active"),
            (keys.dead(), "dead"),
            (keys.events(), "events"),
            (keys.wake(), "wake"),
            (keys.workers(), "workers"),
            (keys.stats(), "stats"),
            (keys.breakers(), "breakers"),
            (keys.dedup(), "dedup"),
            (keys.lane(Priority::High), "ready:high"),
            (keys.lane(Priority::Normal), "ready:normal"),
            (keys.lane(Priority::Low), "ready:low"),
        ];
        for (key, name) in named {
            assert_eq!(key, format!("p:{{q}}:{name}"));
        }
        assert_eq!(keys.base(), "p:{q}");
        // The order common.lua reads them in.
        assert_eq!(
            keys.all()[1..4],
            ["p:{q}:ready:high", "p:{q}:ready:normal", "p:{q}:ready:low"]
        );
        assert_eq!(keys.all()[8], "p:{q}:dedup");
        assert_eq!(keys.all()[ENQUEUE_KEYS - 1], "p:{q}:limits_exp");
        assert_eq!(keys.all()[14], "p:{q}:leases");
        assert_eq!(keys.all()[18], "p:{q}:finished");
        assert_eq!(keys.all()[20], "p:{q}:seq");
    }
}
