//! A runtime whose initialisation fails: it reports to `/runtime/init/error` and exits, as a
//! custom runtime must.
#![forbid(unsafe_code)]

use std::io::{Read, Write};

fn main() {
    let api = std::env::var("AWS_LAMBDA_RUNTIME_API").unwrap_or_else(|_| "127.0.0.1:9001".into());
    let body = r#"{"errorMessage":"cannot load configuration: missing TABLE_NAME","errorType":"Runtime.ConfigError"}"#;
    if let Ok(mut s) = std::net::TcpStream::connect(&api) {
        let req = format!(
            "POST /2018-06-01/runtime/init/error HTTP/1.1\r\nHost: {api}\r\n\
             Lambda-Runtime-Function-Error-Type: Runtime.ConfigError\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(req.as_bytes());
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
    }
    std::process::exit(1);
}
