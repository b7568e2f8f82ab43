//! The host–agent protocol: small, versioned, length-prefixed frames over one byte stream (a
//! Unix socket for the jail, virtio-vsock for the micro-VM).
//!
//! ```text
//! frame   := header payload
//! header  := version:u8 (=1) kind:u8 reserved:u16 (=0) length:u32 (LE, payload bytes)
//! payload := fields in a fixed order per kind; bytes/strings as length:u32 (LE) + data;
//!            integers as u64/i64 (LE)
//! ```
//!
//! Both sides treat the other as hostile: a frame longer than [`MAX_FRAME_BYTES`], an unknown
//! version or kind, a field that runs past the payload, invalid UTF-8 or trailing bytes is a
//! [`ProtocolError`], never a panic or an allocation larger than the frame.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Header size.
pub const HEADER_BYTES: usize = 8;
/// Largest payload: Lambda's 6 MiB synchronous limit, plus room for the other fields.
pub const MAX_FRAME_BYTES: usize = 6 * 1024 * 1024 + 64 * 1024;

/// What the host tells the function at start-up: what Lambda puts in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// Function name.
    pub function_name: String,
    /// Function version (`$LATEST`).
    pub function_version: String,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Handler (`_HANDLER`).
    pub handler: String,
    /// Region (`AWS_REGION`).
    pub region: String,
    /// User environment variables, `NAME=value`.
    pub environment: Vec<(String, String)>,
}

/// One invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoke {
    /// The request id (`Lambda-Runtime-Aws-Request-Id`).
    pub request_id: String,
    /// Deadline, Unix milliseconds (`Lambda-Runtime-Deadline-Ms`).
    pub deadline_ms: u64,
    /// Function ARN (`Lambda-Runtime-Invoked-Function-Arn`).
    pub function_arn: String,
    /// Trace id (`Lambda-Runtime-Trace-Id`).
    pub trace_id: String,
    /// The event.
    pub payload: Vec<u8>,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Host → agent, first frame: start `bootstrap` with this environment.
    Start(Start),
    /// Host → agent: deliver an invocation to `/invocation/next`.
    Invoke(Invoke),
    /// Host → agent: stop the runtime and exit.
    Shutdown,
    /// Agent → host: the runtime asked for its first event (init finished).
    Ready,
    /// Agent → host: `/invocation/{id}/response`.
    Response {
        /// The request.
        request_id: String,
        /// The function's result.
        payload: Vec<u8>,
    },
    /// Agent → host: `/invocation/{id}/error`.
    FunctionError {
        /// The request.
        request_id: String,
        /// `Lambda-Runtime-Function-Error-Type` (or the body's `errorType`).
        error_type: String,
        /// The error body (`{"errorMessage", "errorType", "stackTrace"}`).
        payload: Vec<u8>,
    },
    /// Agent → host: `/runtime/init/error`.
    InitError {
        /// The error type.
        error_type: String,
        /// The error body.
        payload: Vec<u8>,
    },
    /// Agent → host: one line of the function's stdout/stderr.
    Log {
        /// The request in flight when it was written (empty outside invocations).
        request_id: String,
        /// The line, without its newline.
        line: String,
    },
    /// Agent → host: `bootstrap` exited.
    Exited {
        /// Exit code, or -1 when killed by a signal.
        code: i64,
        /// The signal number, or 0.
        signal: i64,
    },
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Start(_) => 1,
            Frame::Invoke(_) => 2,
            Frame::Shutdown => 3,
            Frame::Ready => 16,
            Frame::Response { .. } => 17,
            Frame::FunctionError { .. } => 18,
            Frame::InitError { .. } => 19,
            Frame::Log { .. } => 20,
            Frame::Exited { .. } => 21,
        }
    }
}

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed or closed mid-frame.
    #[error("read or write frame: {0}")]
    Io(#[from] io::Error),
    /// The peer speaks another version.
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    Version(u8),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// A frame over the size limit.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// A malformed payload.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, b: &[u8]) {
        let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < n {
            return Err(ProtocolError::Malformed(
                "field runs past the end of the frame",
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn i64(&mut self) -> Result<i64, ProtocolError> {
        Ok(self.u64()? as i64)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, ProtocolError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn str(&mut self) -> Result<String, ProtocolError> {
        String::from_utf8(self.bytes()?)
            .map_err(|_| ProtocolError::Malformed("string is not UTF-8"))
    }
    fn end(self) -> Result<(), ProtocolError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed(
                "trailing bytes after the last field",
            ))
        }
    }
}

/// Encodes a frame (header and payload).
///
/// # Errors
/// [`ProtocolError::TooLarge`] when the payload exceeds [`MAX_FRAME_BYTES`].
pub fn encode(frame: &Frame) -> Result<Vec<u8>, ProtocolError> {
    let mut w = Writer(Vec::with_capacity(64));
    w.0.extend_from_slice(&[VERSION, frame.kind(), 0, 0, 0, 0, 0, 0]);
    match frame {
        Frame::Start(s) => {
            w.str(&s.function_name);
            w.str(&s.function_version);
            w.u64(s.memory_mb);
            w.str(&s.handler);
            w.str(&s.region);
            w.u64(s.environment.len() as u64);
            for (k, v) in &s.environment {
                w.str(k);
                w.str(v);
            }
        }
        Frame::Invoke(i) => {
            w.str(&i.request_id);
            w.u64(i.deadline_ms);
            w.str(&i.function_arn);
            w.str(&i.trace_id);
            w.bytes(&i.payload);
        }
        Frame::Shutdown | Frame::Ready => {}
        Frame::Response {
            request_id,
            payload,
        } => {
            w.str(request_id);
            w.bytes(payload);
        }
        Frame::FunctionError {
            request_id,
            error_type,
            payload,
        } => {
            w.str(request_id);
            w.str(error_type);
            w.bytes(payload);
        }
        Frame::InitError {
            error_type,
            payload,
        } => {
            w.str(error_type);
            w.bytes(payload);
        }
        Frame::Log { request_id, line } => {
            w.str(request_id);
            w.str(line);
        }
        Frame::Exited { code, signal } => {
            w.i64(*code);
            w.i64(*signal);
        }
    }
    let len = w.0.len() - HEADER_BYTES;
    if len > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge(len));
    }
    let len32 = u32::try_from(len).map_err(|_| ProtocolError::TooLarge(len))?;
    w.0[4..8].copy_from_slice(&len32.to_le_bytes());
    Ok(w.0)
}

/// Parses a header: `(kind, payload length)`.
///
/// # Errors
/// Unknown version, non-zero reserved bits, or a length over the limit.
pub fn decode_header(h: &[u8; HEADER_BYTES]) -> Result<(u8, usize), ProtocolError> {
    if h[0] != VERSION {
        return Err(ProtocolError::Version(h[0]));
    }
    if h[2] != 0 || h[3] != 0 {
        return Err(ProtocolError::Malformed("reserved header bits set"));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok((h[1], len))
}

/// Decodes the payload of a frame of `kind`.
///
/// # Errors
/// An unknown kind or a malformed payload.
pub fn decode_payload(kind: u8, payload: &[u8]) -> Result<Frame, ProtocolError> {
    let mut r = Reader(payload);
    let frame = match kind {
        1 => {
            let function_name = r.str()?;
            let function_version = r.str()?;
            let memory_mb = r.u64()?;
            let handler = r.str()?;
            let region = r.str()?;
            let n = r.u64()?;
            // Each pair takes at least 8 bytes, so `n` cannot make us allocate past the frame.
            if n > (r.0.len() / 8) as u64 {
                return Err(ProtocolError::Malformed(
                    "environment count exceeds the frame",
                ));
            }
            let mut environment = Vec::with_capacity(n as usize);
            for _ in 0..n {
                environment.push((r.str()?, r.str()?));
            }
            Frame::Start(Start {
                function_name,
                function_version,
                memory_mb,
                handler,
                region,
                environment,
            })
        }
        2 => Frame::Invoke(Invoke {
            request_id: r.str()?,
            deadline_ms: r.u64()?,
            function_arn: r.str()?,
            trace_id: r.str()?,
            payload: r.bytes()?,
        }),
        3 => Frame::Shutdown,
        16 => Frame::Ready,
        17 => Frame::Response {
            request_id: r.str()?,
            payload: r.bytes()?,
        },
        18 => Frame::FunctionError {
            request_id: r.str()?,
            error_type: r.str()?,
            payload: r.bytes()?,
        },
        19 => Frame::InitError {
            error_type: r.str()?,
            payload: r.bytes()?,
        },
        20 => Frame::Log {
            request_id: r.str()?,
            line: r.str()?,
        },
        21 => Frame::Exited {
            code: r.i64()?,
            signal: r.i64()?,
        },
        other => return Err(ProtocolError::Kind(other)),
    };
    r.end()?;
    Ok(frame)
}

/// Decodes one whole frame from `buf` (header and payload, nothing after).
///
/// # Errors
/// As [`decode_header`] and [`decode_payload`], and when `buf` is not exactly one frame.
pub fn decode(buf: &[u8]) -> Result<Frame, ProtocolError> {
    let Some((header, payload)) = buf.split_first_chunk::<HEADER_BYTES>() else {
        return Err(ProtocolError::Malformed("shorter than a header"));
    };
    let (kind, len) = decode_header(header)?;
    if payload.len() != len {
        return Err(ProtocolError::Malformed(
            "length does not match the payload",
        ));
    }
    decode_payload(kind, payload)
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
///
/// # Errors
/// I/O errors, or a frame the peer got wrong.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ProtocolError> {
    let mut header = [0u8; HEADER_BYTES];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (kind, len) = decode_header(&header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    decode_payload(kind, &payload).map(Some)
}

/// Writes one frame and flushes.
///
/// # Errors
/// I/O errors, or [`ProtocolError::TooLarge`].
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), ProtocolError> {
    let buf = encode(frame)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Start(Start {
                function_name: "f".into(),
                function_version: "$LATEST".into(),
                memory_mb: 128,
                handler: "bootstrap".into(),
                region: "us-east-1".into(),
                environment: vec![("A".into(), "1".into()), ("B".into(), String::new())],
            }),
            Frame::Invoke(Invoke {
                request_id: "r".into(),
                deadline_ms: 42,
                function_arn: "arn".into(),
                trace_id: "t".into(),
                payload: b"{}".to_vec(),
            }),
            Frame::Shutdown,
            Frame::Ready,
            Frame::Response {
                request_id: "r".into(),
                payload: vec![0, 1, 2],
            },
            Frame::FunctionError {
                request_id: "r".into(),
                error_type: "E".into(),
                payload: b"x".to_vec(),
            },
            Frame::InitError {
                error_type: "E".into(),
                payload: vec![],
            },
            Frame::Log {
                request_id: String::new(),
                line: "hello".into(),
            },
            Frame::Exited {
                code: -1,
                signal: 9,
            },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in samples() {
            let bytes = encode(&f).expect("encode");
            assert_eq!(decode(&bytes).expect("decode"), f);
        }
    }

    #[test]
    fn truncations_and_extensions_are_rejected_not_panics() {
        for f in samples() {
            let bytes = encode(&f).expect("encode");
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_err(), "{f:?} cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode(&longer).is_err());
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocating() {
        let mut h = [VERSION, 2, 0, 0, 0, 0, 0, 0];
        h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_header(&h), Err(ProtocolError::TooLarge(_))));
        // An inner length larger than the frame is malformed, not an allocation.
        let mut bytes = encode(&Frame::Response {
            request_id: "r".into(),
            payload: vec![],
        })
        .expect("encode");
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&bytes), Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn wrong_version_and_kind_are_named() {
        assert!(matches!(
            decode(&[2, 3, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::Version(2))
        ));
        assert!(matches!(
            decode(&[1, 99, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::Kind(99))
        ));
    }
}

#[cfg(test)]
mod randomized {
    //! The fuzz target's property over random and mutated inputs, in the normal test suite.
    use super::*;

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn check(data: &[u8]) {
        if let Ok(frame) = decode(data) {
            assert_eq!(
                encode(&frame).expect("encodes"),
                data,
                "non-canonical frame accepted: {frame:?}"
            );
        }
    }

    #[test]
    fn random_and_mutated_frames_never_panic_and_round_trip() {
        let mut rng = Rng(0x5eed_1234_abcd_ef01);
        let seeds: Vec<Vec<u8>> = [
            Frame::Invoke(Invoke {
                request_id: "req".into(),
                deadline_ms: 7,
                function_arn: "arn".into(),
                trace_id: String::new(),
                payload: b"{\"a\":1}".to_vec(),
            }),
            Frame::Start(Start {
                function_name: "f".into(),
                function_version: "$LATEST".into(),
                memory_mb: 128,
                handler: "h".into(),
                region: "r".into(),
                environment: vec![("K".into(), "V".into())],
            }),
            Frame::Log {
                request_id: "r".into(),
                line: "l".into(),
            },
        ]
        .iter()
        .map(|f| encode(f).expect("encode"))
        .collect();
        for _ in 0..20_000 {
            let mut data = seeds[(rng.next() % seeds.len() as u64) as usize].clone();
            for _ in 0..(rng.next() % 4) {
                let i = (rng.next() % data.len() as u64) as usize;
                data[i] = rng.next() as u8;
            }
            if rng.next() % 5 == 0 {
                data.truncate((rng.next() % (data.len() as u64 + 1)) as usize);
            }
            check(&data);
            let len = (rng.next() % 64) as usize;
            let random: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            check(&random);
        }
    }
}
