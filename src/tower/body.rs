//! [`Body`]: the body type the layer hands to the inner service and returns, and the
//! bounded reading of request and response bodies.

use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
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
        Full { bytes: Option<Bytes>, trailers: Option<HeaderMap> },
        Inner { #[pin] body: B },
        // What was read of a body, then the rest of it as it comes.
        Prefixed { prefix: Option<Bytes>, body: Pin<Box<B>> },
    }
}

impl<B> Body<B> {
    /// A body of these bytes, read whole.
    pub fn full(bytes: impl Into<Bytes>) -> Body<B> {
        let bytes: Bytes = bytes.into();
        Body::read_whole(bytes, None)
    }

    /// A body read whole: its bytes, then its trailers.
    pub(crate) fn read_whole(bytes: Bytes, trailers: Option<HeaderMap>) -> Body<B> {
        Body {
            kind: Kind::Full {
                bytes: (!bytes.is_empty()).then_some(bytes),
                trailers,
            },
        }
    }

    /// The part of `body` already read, `prefix`, then the rest of `body`.
    pub(crate) fn prefixed(prefix: Bytes, body: Pin<Box<B>>) -> Body<B> {
        Body {
            kind: Kind::Prefixed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                body,
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
            KindProj::Full { bytes, trailers } => Poll::Ready(
                bytes
                    .take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Prefixed { prefix, body } => match prefix.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => body.as_mut().poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { bytes, trailers } => bytes.is_none() && trailers.is_none(),
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Prefixed { prefix, body } => prefix.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { bytes, .. } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Kind::Inner { body } => body.size_hint(),
            Kind::Prefixed { prefix, body } => {
                let read = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let rest = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(read));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(read));
                }
                hint
            }
        }
    }
}

impl<B> std::fmt::Debug for Body<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Full { bytes, .. } => f
                .debug_struct("Body::Full")
                .field("len", &bytes.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Inner { .. } => f.write_str("Body::Inner"),
            Kind::Prefixed { prefix, .. } => f
                .debug_struct("Body::Prefixed")
                .field("read", &prefix.as_ref().map_or(0, Bytes::len))
                .finish(),
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
    let mut read = Gathered::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Failed(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if read.push(data) > limit {
            return Err(ReadError::TooLarge);
        }
    }
    Ok(read.finish())
}

/// The data frames of a body, joined; one frame (the common case for small bodies) is kept
/// without a copy.
#[derive(Default)]
struct Gathered {
    first: Option<Bytes>,
    joined: Option<BytesMut>,
    len: usize,
}

impl Gathered {
    /// Adds `data`; returns how many bytes were gathered in all.
    fn push(&mut self, data: Bytes) -> usize {
        self.len = self.len.saturating_add(data.len());
        match (&mut self.first, &mut self.joined) {
            (None, None) => self.first = Some(data),
            (Some(head), None) => {
                let mut joined = BytesMut::with_capacity(self.len);
                joined.extend_from_slice(head);
                joined.extend_from_slice(&data);
                self.first = None;
                self.joined = Some(joined);
            }
            (_, Some(joined)) => joined.extend_from_slice(&data),
        }
        self.len
    }

    fn finish(self) -> Bytes {
        match (self.first, self.joined) {
            (_, Some(joined)) => joined.freeze(),
            (Some(one), None) => one,
            (None, None) => Bytes::new(),
        }
    }
}

/// A response body as far as the layer read it.
pub(crate) enum ReadBody<B> {
    /// The whole body (at most the limit), and its trailers.
    Whole {
        bytes: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// More than the limit: the bytes read so far, and the rest of the body, unread.
    Over { read: Bytes, rest: Pin<Box<B>> },
    /// The body failed before its end; its error, as text.
    Failed(String),
}

/// Reads a response body whole if it holds at most `limit` bytes; stops reading as soon as
/// it is known to hold more (from its announced length, before reading anything, or once
/// more arrived), so that what cannot be stored is never held in memory whole, and a body
/// that never ends (a stream of events) is passed on as it comes.
pub(crate) async fn read_response<B>(body: B, limit: usize) -> ReadBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = Box::pin(body);
    if usize::try_from(body.size_hint().lower()).map_or(true, |lower| lower > limit) {
        return ReadBody::Over {
            read: Bytes::new(),
            rest: body,
        };
    }
    let mut read = Gathered::default();
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return ReadBody::Failed(e.to_string()),
        };
        match frame.into_data() {
            Ok(data) => {
                if read.push(data) > limit {
                    return ReadBody::Over {
                        read: read.finish(),
                        rest: body,
                    };
                }
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(more);
                }
            }
        }
    }
    ReadBody::Whole {
        bytes: read.finish(),
        trailers,
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{Full, StreamBody};

    use super::*;

    /// A body of these frames.
    fn frames(frames: Vec<Frame<Bytes>>) -> impl http_body::Body<Data = Bytes, Error = Infallible> {
        StreamBody::new(futures_util::stream::iter(
            frames.into_iter().map(Ok::<_, Infallible>),
        ))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_response_is_read_up_to_the_limit_and_no_further() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        let small = frames(vec![
            Frame::data(Bytes::from_static(b"ab")),
            Frame::data(Bytes::from_static(b"cd")),
            Frame::trailers(trailers.clone()),
        ]);
        match read_response(small, 4).await {
            ReadBody::Whole { bytes, trailers: t } => {
                assert_eq!(bytes, "abcd");
                assert_eq!(t, Some(trailers));
            }
            _ => panic!("a body at the limit is read whole"),
        }

        let large = frames(vec![
            Frame::data(Bytes::from_static(b"abc")),
            Frame::data(Bytes::from_static(b"de")),
            Frame::data(Bytes::from_static(b"fg")),
        ]);
        let ReadBody::Over { read, rest } = read_response(large, 4).await else {
            panic!("a body over the limit is not read whole");
        };
        assert_eq!(read, "abcde");
        let passed = Body::prefixed(read, rest).collect().await.unwrap();
        assert_eq!(passed.to_bytes(), "abcdefg");

        // Announced larger: nothing is read.
        let announced = Full::new(Bytes::from_static(b"abcde"));
        let ReadBody::Over { read, rest } = read_response(announced, 4).await else {
            panic!("a body announced over the limit is not read");
        };
        assert!(read.is_empty());
        assert_eq!(rest.collect().await.unwrap().to_bytes(), "abcde");
    }
}
