//! Fuzzes the host–agent protocol decoder with arbitrary bytes, as a hostile peer would send
//! them: it must never panic, never allocate past the frame, and everything it accepts must
//! re-encode to exactly the bytes it came from (the encoding is canonical).
//!
//! Run: `cd workers/agent/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run frame`
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_agent::protocol::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode(data) {
        let again = encode(&frame).expect("a decoded frame encodes");
        assert_eq!(again, data, "non-canonical frame accepted: {frame:?}");
    }
});
