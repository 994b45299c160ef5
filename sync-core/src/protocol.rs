//! Wire frames of `fieldsync/1`.
//!
//! Every frame is a 4-byte big-endian body length, then the body: one type
//! byte and the payload. Integers inside payloads are LEB128 varints. Frames
//! larger than the receiver's limit are refused before they are buffered.

use schemas::ids::DocId;

/// ALPN of the protocol; the version is in the string.
pub const ALPN: &[u8] = b"fieldsync/1";
pub const VERSION: u8 = 1;
/// Bytes of the heads digest carried per document in a manifest.
pub const DIGEST_LEN: usize = 12;

/// Which stream a frame travels on. The command plane is never queued
/// behind the telemetry plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Plane {
    Command = 0,
    Telemetry = 1,
}

impl Plane {
    pub fn of(doc: &DocId) -> Plane {
        if doc.kind().is_command_plane() {
            Plane::Command
        } else {
            Plane::Telemetry
        }
    }
}

/// Error codes carried by [`Frame::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    Malformed = 1,
    FrameTooLarge = 2,
    TooManyDocuments = 3,
    TooManyRounds = 4,
    NotAuthorised = 5,
    RateLimited = 6,
    Refused = 7,
    Internal = 8,
    Version = 9,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        [
            Malformed,
            FrameTooLarge,
            TooManyDocuments,
            TooManyRounds,
            NotAuthorised,
            RateLimited,
            Refused,
            Internal,
            Version,
        ]
        .into_iter()
        .find(|c| *c as u16 == v)
    }
}

/// One manifest entry: a document and a digest of its heads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub doc: DocId,
    pub digest: [u8; DIGEST_LEN],
}

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello {
        version: u8,
        max_frame: u32,
    },
    /// Digest of the whole scope: equal digests mean nothing to do.
    Summary {
        count: u32,
        root: [u8; 16],
    },
    /// Part of the full manifest; `last` ends it. Ids are prefix-compressed
    /// against the previous entry of the same frame.
    Manifest {
        entries: Vec<ManifestEntry>,
        last: bool,
    },
    /// An Automerge sync message for one document, with the author's
    /// signature of each change it carries (in message order).
    Sync {
        doc: DocId,
        sigs: Vec<[u8; 64]>,
        msg: Vec<u8>,
    },
    Error {
        code: u16,
        doc: Option<DocId>,
        message: String,
    },
}

/// A frame that did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bad(what: &str) -> FrameError {
        FrameError::Malformed(what.to_string())
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        let (&v, rest) = self.b.split_first().ok_or_else(|| Self::bad("truncated"))?;
        self.b = rest;
        Ok(v)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(Self::bad("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn varint(&mut self) -> Result<u64, FrameError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Self::bad("varint too long"))
    }
    fn len(&mut self) -> Result<usize, FrameError> {
        let v = self.varint()?;
        usize::try_from(v)
            .ok()
            .filter(|n| *n <= self.b.len())
            .ok_or_else(|| Self::bad("length exceeds frame"))
    }
    fn doc(&mut self) -> Result<DocId, FrameError> {
        let n = self.len()?;
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| Self::bad("doc id is not utf-8"))?;
        s.parse().map_err(|e| FrameError::Malformed(format!("{e}")))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

impl Frame {
    /// Encode with the 4-byte length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            Frame::Hello { version, max_frame } => {
                body.push(1);
                body.push(*version);
                body.extend_from_slice(&max_frame.to_be_bytes());
            }
            Frame::Summary { count, root } => {
                body.push(2);
                put_varint(&mut body, u64::from(*count));
                body.extend_from_slice(root);
            }
            Frame::Manifest { entries, last } => {
                body.push(3);
                body.push(u8::from(*last));
                put_varint(&mut body, entries.len() as u64);
                let mut prev = String::new();
                for e in entries {
                    let id = e.doc.to_string();
                    let shared = prev
                        .bytes()
                        .zip(id.bytes())
                        .take_while(|(a, b)| a == b)
                        .count();
                    put_varint(&mut body, shared as u64);
                    put_bytes(&mut body, &id.as_bytes()[shared..]);
                    body.extend_from_slice(&e.digest);
                    prev = id;
                }
            }
            Frame::Sync { doc, sigs, msg } => {
                body.push(4);
                put_bytes(&mut body, doc.to_string().as_bytes());
                put_varint(&mut body, sigs.len() as u64);
                for s in sigs {
                    body.extend_from_slice(s);
                }
                body.extend_from_slice(msg);
            }
            Frame::Error { code, doc, message } => {
                body.push(5);
                body.extend_from_slice(&code.to_be_bytes());
                put_bytes(
                    &mut body,
                    doc.as_ref()
                        .map(|d| d.to_string())
                        .unwrap_or_default()
                        .as_bytes(),
                );
                put_bytes(&mut body, message.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(body.len() + 4);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decode one frame body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
        let mut r = Reader { b: body };
        match r.u8()? {
            1 => {
                let version = r.u8()?;
                let m = r.take(4)?;
                Ok(Frame::Hello {
                    version,
                    max_frame: u32::from_be_bytes([m[0], m[1], m[2], m[3]]),
                })
            }
            2 => {
                let count =
                    u32::try_from(r.varint()?).map_err(|_| Reader::bad("count too large"))?;
                let mut root = [0u8; 16];
                root.copy_from_slice(r.take(16)?);
                Ok(Frame::Summary { count, root })
            }
            3 => {
                let last = r.u8()? != 0;
                let n = r.varint()?;
                let mut entries = Vec::new();
                let mut prev = String::new();
                for _ in 0..n {
                    let shared = usize::try_from(r.varint()?).map_err(|_| Reader::bad("prefix"))?;
                    if shared > prev.len() {
                        return Err(Reader::bad("prefix longer than previous id"));
                    }
                    let len = r.len()?;
                    let suffix = r.take(len)?;
                    let mut id = prev.as_bytes()[..shared].to_vec();
                    id.extend_from_slice(suffix);
                    let text =
                        String::from_utf8(id).map_err(|_| Reader::bad("doc id is not utf-8"))?;
                    let doc = text
                        .parse()
                        .map_err(|e| FrameError::Malformed(format!("{e}")))?;
                    let mut digest = [0u8; DIGEST_LEN];
                    digest.copy_from_slice(r.take(DIGEST_LEN)?);
                    entries.push(ManifestEntry { doc, digest });
                    prev = text;
                }
                Ok(Frame::Manifest { entries, last })
            }
            4 => {
                let doc = r.doc()?;
                let n = r.varint()?;
                if n > (r.b.len() / 64) as u64 {
                    return Err(Reader::bad("more signatures than bytes"));
                }
                let mut sigs = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let mut s = [0u8; 64];
                    s.copy_from_slice(r.take(64)?);
                    sigs.push(s);
                }
                Ok(Frame::Sync {
                    doc,
                    sigs,
                    msg: r.rest().to_vec(),
                })
            }
            5 => {
                let c = r.take(2)?;
                let code = u16::from_be_bytes([c[0], c[1]]);
                let n = r.len()?;
                let d = std::str::from_utf8(r.take(n)?)
                    .map_err(|_| Reader::bad("doc id is not utf-8"))?;
                let doc = if d.is_empty() { None } else { d.parse().ok() };
                let n = r.len()?;
                let message = String::from_utf8_lossy(r.take(n)?).into_owned();
                Ok(Frame::Error { code, doc, message })
            }
            t => Err(FrameError::Malformed(format!("unknown frame type {t}"))),
        }
    }
}

/// Incremental decoder of a byte stream into frame bodies.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    max: usize,
}

impl FrameReader {
    pub fn new(max_frame: usize) -> FrameReader {
        FrameReader {
            buf: Vec::new(),
            max: max_frame,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if buffered. A frame over the limit is an
    /// error as soon as its length prefix is seen.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = Frame::decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        frame.map(Some)
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: Frame) {
        let bytes = f.encode();
        let mut r = FrameReader::new(1 << 20);
        // Feed byte by byte: the reader must reassemble.
        for b in &bytes {
            r.push(std::slice::from_ref(b));
        }
        assert_eq!(r.next_frame().unwrap(), Some(f));
        assert_eq!(r.next_frame().unwrap(), None);
    }

    #[test]
    fn frames_roundtrip() {
        let d: DocId = "t/acme/s/s1/tel/dev-1/2026-11-23".parse().unwrap();
        let d2: DocId = "t/acme/s/s1/tel/dev-1/2026-11-24".parse().unwrap();
        roundtrip(Frame::Hello {
            version: 1,
            max_frame: 1 << 20,
        });
        roundtrip(Frame::Summary {
            count: 1000,
            root: [7; 16],
        });
        roundtrip(Frame::Manifest {
            entries: vec![
                ManifestEntry {
                    doc: d.clone(),
                    digest: [1; 12],
                },
                ManifestEntry {
                    doc: d2,
                    digest: [2; 12],
                },
            ],
            last: true,
        });
        roundtrip(Frame::Sync {
            doc: d.clone(),
            sigs: vec![[9; 64]],
            msg: vec![1, 2, 3],
        });
        roundtrip(Frame::Error {
            code: 4,
            doc: Some(d),
            message: "too many rounds".into(),
        });
        roundtrip(Frame::Error {
            code: 1,
            doc: None,
            message: String::new(),
        });
    }

    #[test]
    fn manifest_entries_are_compact() {
        let entries: Vec<ManifestEntry> = (0..1000)
            .map(|i| ManifestEntry {
                doc: format!("t/acme/s/site-1/tel/device-{:03}/2026-11-23", i)
                    .parse()
                    .unwrap(),
                digest: [0; 12],
            })
            .collect();
        let n = Frame::Manifest {
            entries,
            last: true,
        }
        .encode()
        .len();
        assert!(n < 1000 * 32, "manifest of 1000 docs took {n} bytes");
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut r = FrameReader::new(16);
        r.push(&[0, 0, 1, 0]);
        assert!(matches!(
            r.next_frame(),
            Err(FrameError::TooLarge { len: 256, max: 16 })
        ));
        assert!(matches!(
            Frame::decode(&[99]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            Frame::decode(&[4, 200]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            Frame::decode(&[3, 1, 1, 5, 1, b'x']),
            Err(FrameError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode(&bytes);
        }
    }
}
