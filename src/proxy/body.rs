//! The one body type both directions use: a streamed peer body, bytes we made, or a stream.
//! An enum, not a box, so the proxied path allocates nothing for its body.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub enum Body {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// An upstream's response, handing its keep-alive connection back when read.
    Upstream(super::upstream::UpstreamBody),
    /// The client's request body on its way upstream, remembering whether the client broke
    /// it: a failed send is then the client's fault, not the upstream's.
    Watched(Incoming, Arc<ClientFault>),
    /// Long-lived streams (SSE) and replayable buffers; rare, so one box is fine.
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Self {
        Body::Full(Some(b.into()))
    }

    pub fn boxed<B>(b: B) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        Body::Boxed(b.map_err(Into::into).boxed_unsync())
    }
}

impl From<Incoming> for Body {
    fn from(b: Incoming) -> Self {
        Body::Incoming(b)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Body::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Body::Watched(b, fault) => Pin::new(b).poll_frame(cx).map_err(|e| {
                fault.set(classify(&e));
                e.into()
            }),
            Body::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Incoming(b) | Body::Watched(b, _) => b.is_end_stream(),
            Body::Upstream(b) => b.is_end_stream(),
            Body::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming(b) | Body::Watched(b, _) => b.size_hint(),
            Body::Upstream(b) => b.size_hint(),
            Body::Boxed(b) => b.size_hint(),
        }
    }
}

/// How a client broke its request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Bad framing (chunk size overflow, bare LF, ...): a 400.
    Malformed,
    /// Hang-up before the announced end, or an h2 stream reset: a client abort (499).
    Aborted,
}

/// Set once by the body when the client's side of it fails.
#[derive(Debug, Default)]
pub struct ClientFault(AtomicU8);

impl ClientFault {
    fn set(&self, f: BodyFault) {
        let v = match f {
            BodyFault::Malformed => 1,
            BodyFault::Aborted => 2,
        };
        let _ = self
            .0
            .compare_exchange(0, v, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<BodyFault> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(BodyFault::Malformed),
            2 => Some(BodyFault::Aborted),
            _ => None,
        }
    }
}

/// Tells a truncated or reset body from a malformed one by the error's causes.
pub fn classify(e: &hyper::Error) -> BodyFault {
    if e.is_incomplete_message() {
        return BodyFault::Aborted;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            )
        {
            return BodyFault::Aborted;
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>()
            && (h2.is_io() || h2.is_go_away() || h2.reason() == Some(h2::Reason::CANCEL))
        {
            return BodyFault::Aborted;
        }
        cur = err.source();
    }
    BodyFault::Malformed
}
