//! Least privilege: the ACL rules voxqueue needs, in one place, so a refusal can say
//! what is missing and the README's `ACL SETUSER` line has a source to match.

/// Every command voxqueue's queue, workers and scripts send. Scripts run with the
/// caller's permissions, so the commands inside the Lua scripts count too.
const COMMANDS: &[&str] = &[
    // Scripts: run as Redis Functions (loaded again after "Function not found"), or by
    // SHA where FCALL is refused or missing (loaded again after NOSCRIPT).
    "fcall",
    "function|load",
    "evalsha",
    "eval",
    "script|load",
    // Reads and waits outside scripts.
    "blpop",
    "xread",
    "xrange",
    "xrevrange",
    "hget",
    "hmget",
    "hgetall",
    "hkeys",
    "zcard",
    "zcount",
    "zrangebyscore",
    "zrevrange",
    "zscore",
    "exists",
    "get",
    "mget",
    "smembers",
    "time",
    // Writes outside scripts (results, streams, catalogue).
    "set",
    "del",
    "hset",
    "hdel",
    "xadd",
    "pexpire",
    "sadd",
    "srem",
    // Inside the Lua scripts.
    "zadd",
    "zrem",
    "zpopmin",
    "zrange",
    "incr",
    "incrby",
    "hincrby",
    "llen",
    "ltrim",
    "rpush",
    "lpush",
    "lpop",
    "lrem",
    // Connection setup by redis-rs.
    "ping",
];

/// The ACL rules a Redis user needs to run queues under `prefix` and nothing more:
/// `ACL SETUSER voxqueue reset on >PASSWORD <these rules>`. The key pattern is the
/// prefix's (`~vq:*` by default), no Pub/Sub channel, and only the commands voxqueue
/// sends (Lua's included). Enqueues that wait for replicas
/// ([`Enqueue::wait_for_replicas`](crate::Enqueue::wait_for_replicas)) also need `+wait`.
pub fn acl_rules(prefix: &str) -> String {
    let mut rules = format!("~{prefix}:* resetchannels -@all");
    for command in COMMANDS {
        rules.push_str(" +");
        rules.push_str(command);
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_match_the_readme_line() {
        let readme = include_str!("../../README.md");
        let line = format!(
            "ACL SETUSER voxqueue reset on >CHANGE-ME {}",
            acl_rules("vq")
        );
        assert!(
            readme.lines().any(|l| l == line),
            "README lacks the line: {line}"
        );
    }

    #[test]
    fn the_rules_name_the_prefix_and_only_the_commands_sent() {
        let rules = acl_rules("app");
        assert!(
            rules.starts_with("~app:* resetchannels -@all +fcall "),
            "{rules}"
        );
        assert!(rules.ends_with(" +ping"), "{rules}");
        assert_eq!(rules.matches(" +").count(), COMMANDS.len());
    }
}
