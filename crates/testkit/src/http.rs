//! Raw HTTP on the loopback: a request written byte for byte (cut short, half closed, with
//! bytes a client library would refuse to send) and whatever comes back.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// An HTTP answer read off a raw connection.
#[derive(Debug)]
pub struct RawReply {
    /// The status code of the status line.
    pub status: u16,
    /// The status line and headers, lower-cased.
    pub head: String,
    /// The body as sent (chunk framing included).
    pub body: String,
}

/// Writes `bytes` to `addr` (`host:port`, or a URL starting with `http://`), then (if
/// `half_close`) shuts the writing side, as a client whose upload was cut short, and reads
/// whatever comes back until the server closes the connection (at most 10 s between reads).
/// A reset after (or instead of) the answer still leaves what was read.
///
/// # Errors
///
/// When the connection cannot be made or the request not written.
pub fn exchange(addr: &str, bytes: &[u8], half_close: bool) -> io::Result<Vec<u8>> {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other(format!("no address for {addr}")))?;
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(bytes)?;
    if half_close {
        stream.shutdown(Shutdown::Write)?;
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    Ok(answer)
}

/// [`exchange`], with the answer split into status, head and body; `None` when what came
/// back is not an HTTP answer (a dropped connection).
///
/// # Errors
///
/// As [`exchange`].
pub fn raw(addr: &str, bytes: &[u8], half_close: bool) -> io::Result<Option<RawReply>> {
    let text = String::from_utf8_lossy(&exchange(addr, bytes, half_close)?).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Ok(None);
    };
    let Some(status) = head.split(' ').nth(1).and_then(|s| s.parse().ok()) else {
        return Ok(None);
    };
    Ok(Some(RawReply {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }))
}

/// `GET path` on `addr` (as in [`exchange`]), the body of a 200 answer.
///
/// # Errors
///
/// When the exchange fails or the answer is not a 200 (the error says what came).
pub fn get(addr: &str, path: &str) -> io::Result<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    match raw(addr, request.as_bytes(), false)? {
        Some(reply) if reply.status == 200 => Ok(reply.body),
        other => Err(io::Error::other(format!("GET {path}: {other:?}"))),
    }
}
