//! The tunnel preamble decoder on arbitrary bytes: it must never panic, never read out of
//! bounds, and whatever it accepts must re-encode to a preamble that decodes to the same
//! value.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/tunnel/preamble.rs"]
#[allow(dead_code)]
mod preamble;

fuzz_target!(|data: &[u8]| {
    if let Ok((p, used)) = preamble::decode(data) {
        assert!(used <= data.len());
        let again = p.encode();
        assert_eq!(preamble::decode(&again), Ok((p, again.len())));
    }
    if data.len() >= preamble::HEADER_LEN {
        let header: [u8; preamble::HEADER_LEN] = data[..preamble::HEADER_LEN].try_into().unwrap();
        if let Ok(len) = preamble::decode_header(&header) {
            assert!(len <= preamble::MAX_BODY);
        }
    }
    let _ = preamble::decode_body(data);
});
