//! A stand-in OpenTelemetry collector: accepts OTLP/HTTP POSTs on loopback, answers
//! 200 and keeps (path, body) of each request for the test to inspect.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

pub type Requests = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Starts the collector; returns its base URL and the requests received so far.
pub fn start() -> (String, Requests) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind collector");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests: Requests = Arc::default();
    let r = Arc::clone(&requests);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let r = Arc::clone(&r);
            std::thread::spawn(move || serve(stream, &r));
        }
    });
    (url, requests)
}

/// Serves the requests of one (keep-alive) connection.
fn serve(stream: TcpStream, requests: &Requests) {
    let mut out = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        requests.lock().unwrap().push((path, body));
        let ok = "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
        if out.write_all(ok.as_bytes()).is_err() {
            return;
        }
    }
}
