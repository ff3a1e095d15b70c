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
        watch: Watch<'a>,
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
            watch: Watch::new(bound, state),
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

pin_project! {
    /// What a stream and a copy sink share: the bound, checked at every poll (a stream whose
    /// items are always ready never lets its timer fire, so every poll also reads the clock),
    /// and the connection, closed when the bound passes and marked broken when an error ends
    /// the session.
    struct Watch<'a> {
        #[pin]
        sleep: Option<Sleep>,
        bound: Option<Bound>,
        check: Option<PollBound>,
        state: &'a ConnState,
    }
}

impl<'a> Watch<'a> {
    fn new(bound: Option<Bound>, state: &'a ConnState) -> Self {
        Watch {
            sleep: bound.map(|b| sleep_until(b.at)),
            check: bound.as_ref().map(PollBound::new),
            bound,
            state,
        }
    }

    /// True when the bound has passed, read from the clock.
    #[inline]
    fn passed(&self) -> bool {
        self.check.as_ref().is_some_and(PollBound::passed)
    }

    /// The timeout error after closing the connection, when the bound has passed (read from
    /// the clock).
    fn passed_error(&self) -> Option<Error> {
        if !self.passed() {
            return None;
        }
        self.timed_out()
    }

    /// After the inner stream or sink was pending: polls the timer; once it fired, closes the
    /// connection and returns the timeout error.
    fn expired(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Option<Error> {
        let sleep = self.as_mut().project().sleep.as_pin_mut()?;
        if sleep.poll(cx).is_pending() {
            return None;
        }
        self.timed_out()
    }

    /// The bound passed: the connection closes at once, and the statement's timeout error.
    fn timed_out(&self) -> Option<Error> {
        self.state.kill();
        self.bound.map(|b| b.timed_out(Phase::Query))
    }

    /// Polls the timer without acting on it: ready once it fired (with no bound, never).
    fn expired_quietly(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.project().sleep.as_pin_mut() {
            Some(s) => s.poll(cx),
            None => Poll::Pending,
        }
    }

    /// The driver's error; an error that ends the session (FATAL, a closed socket) marks the
    /// connection broken. Any other error response ends only the statement.
    fn failed(&self, e: tokio_postgres::Error) -> Error {
        if crate::client::ends_session(&e) {
            self.state.kill_broken();
        }
        Error::Query(e)
    }
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
            if let Some(e) = this.watch.passed_error() {
                *this.failed = true;
                return Poll::Ready(Some(Err(e)));
            }
            match this.inner.poll_next(cx) {
                Poll::Ready(Some(Ok(v))) => return Poll::Ready(Some(Ok(v))),
                // An error response ends the statement; the connection stays usable.
                Poll::Ready(Some(Err(e))) => {
                    if let Some(g) = this.guard.take() {
                        g.done();
                    }
                    return Poll::Ready(Some(Err(this.watch.failed(e))));
                }
                Poll::Ready(None) => *this.ending = true,
                Poll::Pending => {
                    return match this.watch.as_mut().expired(cx) {
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
        let state = this.watch.state;
        if let Some(g) = this.guard.as_ref()
            && state.wire.poll_ready_for(g.request, cx).is_pending()
            && !state.health(false).killed
            && !this.watch.passed()
            && this.watch.as_mut().expired_quietly(cx).is_pending()
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

pin_project! {
    /// A sink for `COPY ... FROM STDIN`, from `copy_in`. Call [`CopyInSink::finish`] at the
    /// end; a sink dropped unfinished makes the pool close the connection.
    pub struct CopyInSink<'a, T> {
        #[pin]
        inner: tokio_postgres::CopyInSink<T>,
        #[pin]
        watch: Watch<'a>,
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
            watch: Watch::new(bound, state),
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
        if let Some(e) = this.watch.passed_error() {
            return Poll::Ready(Err(e));
        }
        if let Poll::Ready(r) = f(this.inner, cx) {
            return Poll::Ready(r.map_err(|e| this.watch.failed(e)));
        }
        match this.watch.expired(cx) {
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
                this.watch
                    .state
                    .await_ready(g.request, this.watch.bound)
                    .await;
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
        let this = self.project();
        this.inner
            .start_send(item)
            .map_err(|e| this.watch.failed(e))
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
