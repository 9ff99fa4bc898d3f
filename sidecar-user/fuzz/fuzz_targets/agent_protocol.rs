//! The agent's registration request parser on arbitrary bytes: any local process can write
//! to the socket, so it must never panic, must refuse lines over the cap, and whatever it
//! accepts must serialize back to a line that parses to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/registration.rs"]
#[allow(dead_code)]
mod protocol;

fuzz_target!(|data: &[u8]| {
    match protocol::parse_request(data) {
        Ok(req) => {
            assert!(data.len() <= protocol::MAX_LINE);
            let line = serde_json::to_vec(&req).expect("requests serialize");
            assert_eq!(protocol::parse_request(&line).ok(), Some(req));
        }
        Err(protocol::ParseError::TooLong) => assert!(data.len() > protocol::MAX_LINE),
        Err(protocol::ParseError::NotARequest(_)) => {}
    }
});
