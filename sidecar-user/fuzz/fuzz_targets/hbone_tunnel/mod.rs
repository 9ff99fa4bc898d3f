//! The HBONE server's modules, compiled from the sidecar's source files.
#![allow(dead_code)]

#[path = "../../../src/tunnel/http2.rs"]
pub mod http2;
#[path = "../../../src/tunnel/request.rs"]
pub mod request;
#[path = "../../../src/tunnel/server.rs"]
pub mod server;
#[path = "../../../src/tunnel/stream.rs"]
pub mod stream;
pub use http2::{MAX_HEADER_LIST, Settings, keepalive};
