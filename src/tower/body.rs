//! [`Body`]: the body type the layer hands to the inner service and returns, and the
//! bounded reading of request and response bodies.

use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

pin_project! {
    /// A request or response body as the layer passes it on: either bytes it read whole
    /// (a guarded request's body, a stored or new response, a problem), or the original body,
    /// untouched (requests and responses of methods the layer does not guard).
    ///
    /// It is an [`http_body::Body`] with `Bytes` data and the original body's error type (the
    /// bytes read whole never fail), so axum's handlers and extractors take it like any body.
    pub struct Body<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { bytes: Option<Bytes> },
        Inner { #[pin] body: B },
    }
}

impl<B> Body<B> {
    /// A body of these bytes, read whole.
    pub fn full(bytes: impl Into<Bytes>) -> Body<B> {
        let bytes: Bytes = bytes.into();
        Body {
            kind: Kind::Full {
                bytes: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }

    /// The original body, passed on untouched.
    pub fn inner(body: B) -> Body<B> {
        Body {
            kind: Kind::Inner { body },
        }
    }
}

impl<B> http_body::Body for Body<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Full { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            KindProj::Inner { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { bytes } => bytes.is_none(),
            Kind::Inner { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Kind::Inner { body } => body.size_hint(),
        }
    }
}

impl<B> std::fmt::Debug for Body<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Full { bytes } => f
                .debug_struct("Body::Full")
                .field("len", &bytes.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Inner { .. } => f.write_str("Body::Inner"),
        }
    }
}

/// Why a request body could not be read whole.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// More than the limit: what the body announced (`Content-Length`) or what arrived.
    TooLarge,
    /// The body failed before its end: a cut upload, a broken connection.
    Failed(String),
}

/// Reads `body` whole, refusing it as soon as it is known to hold more than `limit` bytes
/// (from its announced length, before reading anything, or once more arrived). Trailers
/// are ignored.
pub(crate) async fn read_limited<B>(body: B, limit: usize) -> Result<Bytes, ReadError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    if usize::try_from(body.size_hint().lower()).map_or(true, |lower| lower > limit) {
        return Err(ReadError::TooLarge);
    }
    let mut body = pin!(body);
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Failed(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len = len.saturating_add(data.len());
        if len > limit {
            return Err(ReadError::TooLarge);
        }
        // One frame (the common case for small bodies) is kept without a copy.
        match (&mut first, &mut rest) {
            (None, None) => first = Some(data),
            (Some(head), None) => {
                let mut joined = BytesMut::with_capacity(len);
                joined.extend_from_slice(head);
                joined.extend_from_slice(&data);
                first = None;
                rest = Some(joined);
            }
            (_, Some(joined)) => joined.extend_from_slice(&data),
        }
    }
    Ok(match (first, rest) {
        (_, Some(joined)) => joined.freeze(),
        (Some(one), None) => one,
        (None, None) => Bytes::new(),
    })
}

/// Reads a response body whole (no limit: the handler made it; whether the store can hold
/// it is decided after). The error is the body's, as text.
pub(crate) async fn read_all<B>(body: B) -> Result<Bytes, String>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    body.collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|e| e.to_string())
}
