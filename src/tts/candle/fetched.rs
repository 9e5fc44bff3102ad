//! Where voice weights are found when nobody names a path: the directory the repository's
//! `.ci/fetch-voices` fills, which the example programs, benches and tests all default to.

use std::ffi::OsString;
use std::path::PathBuf;

/// The default directory of fetched voice weights: `$VOXQUEUE_VOICES` when set and not
/// empty, else `~/.cache/voxqueue/voices`. `.ci/fetch-voices` puts Piper voices
/// (`en_US-joe-medium.onnx` and its `.onnx.json`) there and Kokoro under `kokoro/`
/// ([`KOKORO_MODEL_FILE`](super::KOKORO_MODEL_FILE) and `voices/`). `None` when neither
/// variable is set. Whether anything is there yet is the caller's to check.
pub fn voices_dir() -> Option<PathBuf> {
    voices_dir_from(
        std::env::var_os("VOXQUEUE_VOICES"),
        std::env::var_os("HOME"),
    )
}

fn voices_dir_from(voices: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    voices
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| home.map(|h| PathBuf::from(h).join(".cache/voxqueue/voices")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_wins_unless_empty_then_the_home_cache() {
        let some = |s: &str| Some(OsString::from(s));
        assert_eq!(
            voices_dir_from(some("/v"), some("/h")),
            Some(PathBuf::from("/v"))
        );
        assert_eq!(
            voices_dir_from(some(""), some("/h")),
            Some(PathBuf::from("/h/.cache/voxqueue/voices"))
        );
        assert_eq!(
            voices_dir_from(None, some("/h")),
            Some(PathBuf::from("/h/.cache/voxqueue/voices"))
        );
        assert_eq!(voices_dir_from(None, None), None);
        assert_eq!(voices_dir_from(some(""), None), None);
    }
}
