//! The JSON voxqueue reads back from Redis through its public types: retry policies (stored
//! with each job), attempt errors (a record's error history), job ids, captions. Any bytes:
//! no panic, and what decodes re-encodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxqueue::retry::RetryPolicy;
use voxqueue::tts::Caption;
use voxqueue::{AttemptError, JobId};

fuzz_target!(|data: &[u8]| {
    if let Ok(policy) = serde_json::from_slice::<RetryPolicy>(data) {
        for attempt in [0, 1, 2, 10, u32::MAX] {
            let _ = policy.delay_for(attempt);
        }
        let again: RetryPolicy =
            serde_json::from_value(serde_json::to_value(&policy).unwrap()).unwrap();
        assert_eq!(again, policy);
    }
    if let Ok(errors) = serde_json::from_slice::<Vec<AttemptError>>(data) {
        let again: Vec<AttemptError> =
            serde_json::from_value(serde_json::to_value(&errors).unwrap()).unwrap();
        assert_eq!(again, errors);
    }
    if let Ok(captions) = serde_json::from_slice::<Vec<Caption>>(data) {
        let again: Vec<Caption> =
            serde_json::from_value(serde_json::to_value(&captions).unwrap()).unwrap();
        assert_eq!(again, captions);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(id) = JobId::new(text)
    {
        assert_eq!(id.as_str(), text);
    }
});
