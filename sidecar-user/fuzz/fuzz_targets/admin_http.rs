//! The admin server's request head parser (`admin/http.rs`) on arbitrary bytes: whatever a
//! local client sends. Properties: never panics; an accepted request has a method without
//! whitespace and a path that starts with `/` and carries no query string (query parameters
//! are dropped, never interpreted).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/admin/http.rs"]
#[allow(dead_code)]
mod http;

fuzz_target!(|data: &[u8]| {
    // The server reads at most MAX_HEAD (+ one read) before it parses.
    let head = &data[..data.len().min(http::MAX_HEAD + 1024)];
    if let Some(req) = http::parse_request(head) {
        assert!(!req.method.is_empty() && !req.method.contains(char::is_whitespace));
        assert!(req.path.starts_with('/'), "{req:?}");
        assert!(
            !req.path.contains('?') && !req.path.contains(char::is_whitespace),
            "{req:?}"
        );
        assert!(req.path.len() <= head.len());
    }
});
