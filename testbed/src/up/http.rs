//! A minimal HTTP/1.1 client for loopback readiness checks, tests and the
//! chaos runner (one request per connection, `Connection: close`, JSON
//! bodies, bearer tokens, a deadline per call; responses with
//! `Content-Length`, chunked, or to end of stream), so neither the testbed
//! nor chaos needs an HTTP client stack. Not a general client.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A failed HTTP call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// Connecting, writing or reading failed.
    #[error("{method} http://{addr}{path}: {detail}")]
    Transport {
        /// Method.
        method: String,
        /// Server.
        addr: SocketAddr,
        /// Path.
        path: String,
        /// What failed.
        detail: String,
    },
    /// The response could not be parsed.
    #[error("{method} http://{addr}{path}: bad response: {detail}")]
    BadResponse {
        /// Method.
        method: String,
        /// Server.
        addr: SocketAddr,
        /// Path.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

/// A response: status and body text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body (chunked encoding removed).
    pub body: String,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// `GET path` with an optional bearer token.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    request("GET", addr, path, bearer, None, timeout).await
}

/// `POST path` with a JSON body and an optional bearer token.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    body: &str,
    timeout: Duration,
) -> Result<Response, HttpError> {
    request("POST", addr, path, bearer, Some(body), timeout).await
}

/// Send one request and read the whole response.
pub async fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
    within: Duration,
) -> Result<Response, HttpError> {
    let transport = |detail: String| HttpError::Transport {
        method: method.to_string(),
        addr,
        path: path.to_string(),
        detail,
    };
    let bad = |detail: String| HttpError::BadResponse {
        method: method.to_string(),
        addr,
        path: path.to_string(),
        detail,
    };
    let payload = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if let Some(t) = bearer {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if body.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!(
        "Content-Length: {}\r\n\r\n{payload}",
        payload.len()
    ));
    let call = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| transport(format!("connect: {e}")))?;
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| transport(format!("write: {e}")))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .await
            .map_err(|e| transport(format!("read: {e}")))?;
        Ok::<_, HttpError>(raw)
    };
    let raw = tokio::time::timeout(within, call)
        .await
        .map_err(|_| transport(format!("no response within {} ms", within.as_millis())))??;
    parse_response(&raw).map_err(bad)
}

/// Parse a complete HTTP/1.1 response (status line, headers, body with
/// `Content-Length`, chunked, or to end of stream).
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = Some(
                    v.parse::<usize>()
                        .map_err(|_| format!("bad length {v:?}"))?,
                );
            }
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)
            .ok_or_else(|| format!("body has {} of {n} bytes", body.len()))?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size without end of line")?;
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = b.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        b = b.get(size + 2..).ok_or("chunk without trailing CRLF")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_with_length_chunked_or_to_eof_parse() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{}"));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "abcde"));
        assert!(!r.ok());
        let r = parse_response(b"HTTP/1.1 201 Created\r\n\r\nall of it").unwrap();
        assert_eq!(r.body, "all of it");
        assert!(parse_response(b"HTTP/1.1 200").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
    }
}
