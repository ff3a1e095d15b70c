//! Streams and copy sinks that stay under the statement's bound and tell the connection when
//! they finish. One dropped before it finishes leaves the connection in an unknown protocol
//! state, so the pool closes it on return.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use futures_util::{Sink, Stream};
use pin_project_lite::pin_project;
use tokio::time::{Sleep, sleep_until};

use crate::conn::{ConnState, InFlight};
use crate::deadline::{Bound, PollBound};
use crate::error::{Error, Phase};

pin_project! {
    /// A stream of results from the server, bounded by the statement's timeout and deadline.
    /// See [`RowStream`], [`SimpleQueryStream`] and [`CopyOutStream`].
    pub struct Tracked<'a, S> {
        #[pin]
        inner: S,
        #[pin]
        sleep: Option<Sleep>,
        bound: Option<Bound>,
        check: Option<PollBound>,
        state: &'a ConnState,
        guard: Option<InFlight<'a>>,
        failed: bool,
        // The inner stream ended; waiting for the socket to deliver the ReadyForQuery.
        ending: bool,
    }
}

/// Rows of a query, from `query_raw`, `query_typed_raw` or `query_portal_raw`.
pub type RowStream<'a> = Tracked<'a, tokio_postgres::RowStream>;
/// Messages of a simple query, from `simple_query_raw`.
pub type SimpleQueryStream<'a> = Tracked<'a, tokio_postgres::SimpleQueryStream>;
/// Data of a `COPY ... TO STDOUT`, from `copy_out`.
pub type CopyOutStream<'a> = Tracked<'a, tokio_postgres::CopyOutStream>;

impl<'a, S> Tracked<'a, S> {
    pub(crate) fn new(
        inner: S,
        bound: Option<Bound>,
        state: &'a ConnState,
        guard: InFlight<'a>,
    ) -> Self {
        Tracked {
            inner,
            sleep: bound.map(|b| sleep_until(b.at)),
            check: bound.as_ref().map(PollBound::new),
            bound,
            state,
            guard: Some(guard),
            failed: false,
            ending: false,
        }
    }
}

impl Tracked<'_, tokio_postgres::RowStream> {
    /// The number of rows the statement affected, once the stream is exhausted.
    pub fn rows_affected(&self) -> Option<u64> {
        self.inner.rows_affected()
    }
}

/// True when the bound has passed, read from the clock: a stream whose items are always ready
/// never lets its timer fire, so every poll looks.
#[inline]
fn passed(check: &Option<PollBound>) -> bool {
    check.is_some_and(|c| c.passed())
}

/// Checks the bound; on expiry closes the connection and returns the timeout error.
fn expired(
    sleep: Pin<&mut Option<Sleep>>,
    bound: &Option<Bound>,
    state: &ConnState,
    cx: &mut Context<'_>,
) -> Option<Error> {
    let sleep = sleep.as_pin_mut()?;
    if sleep.poll(cx).is_pending() {
        return None;
    }
    state.kill();
    bound.map(|b| b.error(Phase::Query))
}

impl<S, T> Stream for Tracked<'_, S>
where
    S: Stream<Item = Result<T, tokio_postgres::Error>>,
{
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if this.guard.is_none() || *this.failed {
            return Poll::Ready(None);
        }
        if !*this.ending {
            if passed(this.check) {
                *this.failed = true;
                this.state.kill();
                return Poll::Ready(this.bound.map(|b| Err(b.error(Phase::Query))));
            }
            match this.inner.poll_next(cx) {
                Poll::Ready(Some(Ok(v))) => return Poll::Ready(Some(Ok(v))),
                // An error response ends the statement; the connection stays usable.
                Poll::Ready(Some(Err(e))) => {
                    if let Some(g) = this.guard.take() {
                        g.done();
                    }
                    if crate::client::ends_session(&e) {
                        this.state.kill_broken();
                    }
                    return Poll::Ready(Some(Err(Error::Query(e))));
                }
                Poll::Ready(None) => *this.ending = true,
                Poll::Pending => {
                    return match expired(this.sleep, this.bound, this.state, cx) {
                        Some(e) => {
                            *this.failed = true;
                            Poll::Ready(Some(Err(e)))
                        }
                        None => Poll::Pending,
                    };
                }
            }
        }
        // Past the bound the wait stops: the connection, not at rest, is closed on return.
        // (tokio-postgres ends a stream at its CommandComplete, which may be read apart from
        // the ReadyForQuery.)
        if let Some(g) = this.guard.as_ref()
            && this.state.wire.poll_ready_for(g.request, cx).is_pending()
            && !this.state.health(false).killed
            && !passed(this.check)
            && expired_quietly(this.sleep.as_mut(), cx).is_pending()
        {
            return Poll::Pending;
        }
        *this.ending = false;
        if let Some(g) = this.guard.take() {
            g.done();
        }
        Poll::Ready(None)
    }
}

/// Polls the bound's timer without acting on it: ready once it fired (or with no bound never).
fn expired_quietly(sleep: Pin<&mut Option<Sleep>>, cx: &mut Context<'_>) -> Poll<()> {
    match sleep.as_pin_mut() {
        Some(s) => s.poll(cx),
        None => Poll::Pending,
    }
}

pin_project! {
    /// A sink for `COPY ... FROM STDIN`, from `copy_in`. Call [`CopyInSink::finish`] at the
    /// end; a sink dropped unfinished makes the pool close the connection.
    pub struct CopyInSink<'a, T> {
        #[pin]
        inner: tokio_postgres::CopyInSink<T>,
        #[pin]
        sleep: Option<Sleep>,
        bound: Option<Bound>,
        check: Option<PollBound>,
        state: &'a ConnState,
        guard: Option<InFlight<'a>>,
    }
}

impl<'a, T: Buf + 'static + Send> CopyInSink<'a, T> {
    pub(crate) fn new(
        inner: tokio_postgres::CopyInSink<T>,
        bound: Option<Bound>,
        state: &'a ConnState,
        guard: InFlight<'a>,
    ) -> Self {
        CopyInSink {
            inner,
            sleep: bound.map(|b| sleep_until(b.at)),
            check: bound.as_ref().map(PollBound::new),
            bound,
            state,
            guard: Some(guard),
        }
    }

    fn poll_bounded<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        f: impl FnOnce(
            Pin<&mut tokio_postgres::CopyInSink<T>>,
            &mut Context<'_>,
        ) -> Poll<Result<R, tokio_postgres::Error>>,
    ) -> Poll<Result<R, Error>> {
        let this = self.project();
        if passed(this.check) {
            this.state.kill();
            return Poll::Ready(Err(this
                .bound
                .map_or(Error::Closed, |b| b.error(Phase::Query))));
        }
        if let Poll::Ready(r) = f(this.inner, cx) {
            return Poll::Ready(r.map_err(Error::Query));
        }
        match expired(this.sleep, this.bound, this.state, cx) {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Pending,
        }
    }

    /// Completes the copy and returns the number of rows copied.
    ///
    /// # Errors
    /// The server's error, or a timeout (the connection is then closed).
    pub async fn finish(mut self: Pin<&mut Self>) -> Result<u64, Error> {
        let rows = std::future::poll_fn(|cx| {
            self.as_mut()
                .poll_bounded(cx, |inner, cx| inner.poll_finish(cx))
        })
        .await;
        // The copy ended, with the server's count or its error (a rejected row, say): either
        // way the server is past it. A timeout or a broken connection leaves it in flight.
        let ended = match &rows {
            Ok(_) => true,
            Err(Error::Query(e)) => crate::client::answered_by_server(e),
            Err(_) => false,
        };
        if ended {
            let this = self.project();
            if let Some(g) = this.guard.take() {
                this.state.await_ready(g.request, *this.bound).await;
                g.done();
            }
        }
        rows
    }
}

impl<T: Buf + 'static + Send> Sink<T> for CopyInSink<'_, T> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_bounded(cx, |inner, cx| inner.poll_ready(cx))
    }

    fn start_send(self: Pin<&mut Self>, item: T) -> Result<(), Error> {
        self.project().inner.start_send(item).map_err(Error::Query)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_bounded(cx, |inner, cx| inner.poll_flush(cx))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        ready!(
            self.as_mut()
                .poll_bounded(cx, |inner, cx| inner.poll_close(cx))
        )?;
        if let Some(g) = self.project().guard.take() {
            g.done();
        }
        Poll::Ready(Ok(()))
    }
}
