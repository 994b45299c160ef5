//! The chaos runner's HTTP calls: testbed's loopback client
//! ([`testbed::up::http`]) with JSON values for bodies.

use std::net::SocketAddr;
use std::time::Duration;

pub use testbed::up::http::{HttpError, Response, parse_response};

/// Send one request with an optional JSON body and read the whole response.
pub async fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    body: Option<&serde_json::Value>,
    within: Duration,
) -> Result<Response, HttpError> {
    let body = body.map(|b| b.to_string());
    testbed::up::http::request(method, addr, path, bearer, body.as_deref(), within).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_request_reaches_a_loopback_server() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !String::from_utf8_lossy(&got).contains("{\"value\":4.0}") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let r = request(
            "PUT",
            addr,
            "/api/devices/d1/desired/setpoint",
            Some("tok"),
            Some(&serde_json::json!({"value": 4.0})),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(r.body, "done");
        let req = server.await.unwrap();
        assert!(req.starts_with("PUT /api/devices/d1/desired/setpoint HTTP/1.1\r\n"));
        assert!(req.contains("Authorization: Bearer tok"));
    }
}
