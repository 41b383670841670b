//! A stand-in OpenTelemetry collector: accepts OTLP/HTTP POSTs on loopback, answers
//! 200 and keeps (path, body) of each request for the test to inspect.

use std::sync::{Arc, Mutex};

use super::http::{serve, Response};

pub type Requests = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Starts the collector; returns its base URL and the requests received so far.
pub fn start() -> (String, Requests) {
    let requests: Requests = Arc::default();
    let r = Arc::clone(&requests);
    let url = serve(move |req| {
        r.lock().unwrap().push((req.path, req.body));
        Response { status: 200, content_type: "application/x-protobuf", body: String::new() }
    });
    (url, requests)
}
