//! A minimal HTTP/1.1 client for loopback readiness checks and tests
//! (`GET`/`POST`, `Connection: close`, content-length or chunked bodies), so
//! the testbed needs no HTTP client stack.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP exchange that failed before a response was read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// Connecting, writing or reading failed.
    #[error("{method} http://{addr}{path}: {source}")]
    Io {
        /// Request method.
        method: &'static str,
        /// Server.
        addr: SocketAddr,
        /// Request path.
        path: String,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// No complete answer in time.
    #[error("{method} http://{addr}{path}: no answer within {timeout:?}")]
    Timeout {
        /// Request method.
        method: &'static str,
        /// Server.
        addr: SocketAddr,
        /// Request path.
        path: String,
        /// The limit.
        timeout: Duration,
    },
    /// The answer is not HTTP/1.x.
    #[error("{method} http://{addr}{path}: malformed response: {reason}")]
    Malformed {
        /// Request method.
        method: &'static str,
        /// Server.
        addr: SocketAddr,
        /// Request path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body (chunked encoding removed).
    pub body: String,
}

impl Response {
    /// 2xx.
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

async fn request(
    method: &'static str,
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let io = |source| HttpError::Io {
        method,
        addr,
        path: path.to_string(),
        source,
    };
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.map_err(io)?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(t) = bearer {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        s.write_all(req.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(io)?;
        Ok(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout {
            method,
            addr,
            path: path.to_string(),
            timeout,
        })??;
    parse(&raw).map_err(|reason| HttpError::Malformed {
        method,
        addr,
        path: path.to_string(),
        reason,
    })
}

/// Parse a complete HTTP/1.x response.
pub(crate) fn parse(raw: &[u8]) -> Result<Response, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "no end of headers".to_string())?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    match parts.next() {
        Some(v) if v.starts_with("HTTP/1.") => {}
        _ => return Err(format!("status line {status_line:?}")),
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok(Response { status, body })
}

fn dechunk(mut s: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s
            .split_once("\r\n")
            .ok_or_else(|| "truncated chunk size".to_string())?;
        let size = size.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size, 16).map_err(|_| format!("chunk size {size:?}"))?;
        if n == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..n).ok_or_else(|| "truncated chunk".to_string())?;
        out.push_str(chunk);
        s = rest.get(n..).unwrap_or("").trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_bodies() {
        let r = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        let r = parse(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "abcde"));
        assert!(!r.ok());
        assert!(parse(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
