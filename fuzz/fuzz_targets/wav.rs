//! Audio a backend hands back (eSpeak NG's streamed WAV): any bytes decode or fail, never
//! panic or allocate past what the bytes hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = voxqueue::tts::decode_wav(data);
});
