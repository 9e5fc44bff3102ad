//! A job payload as the TTS worker decodes it: any bytes as a `SynthesisRequest`. No panic;
//! a request that decodes validates without panicking, and one that validates round-trips
//! through JSON and has a dedup key.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use voxqueue::tts::{Limits, SynthesisRequest, deduplicator};

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<SynthesisRequest>(data) else {
        return;
    };
    let _ = req.normalized();
    let _ = req.dedup_fields();
    if req.validate(&Limits::default(), &[]).is_ok() {
        let json = serde_json::to_vec(&req).expect("a valid request serialises");
        let back: SynthesisRequest = serde_json::from_slice(&json).expect("and reads back");
        assert_eq!(back, req);
        deduplicator(Duration::from_secs(1))
            .key(&req)
            .expect("a dedup key");
    }
});
