//! The emulator's modelled network (`client_latency`, `upstream_latency`) and its round-trip
//! count, against the real PostgreSQL. Latencies are large (50-100 ms) so that a loaded
//! machine's noise is small beside them; every bound is generous.
#![cfg(feature = "emulator")]

mod common;

use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use common::emulator as start;
use pinpool::emulator::Emulator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::types::Type;

const L: Duration = Duration::from_millis(50);

async fn client(emu: &Emulator, app: &str) -> tokio_postgres::Client {
    let url = format!("{}?application_name={app}", emu.url("postgres", "postgres"));
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect through the emulator");
    tokio::spawn(conn);
    c
}

async fn typed(c: &tokio_postgres::Client, v: i32) -> i32 {
    c.query_typed("SELECT $1::int4", &[(&v, Type::INT4)])
        .await
        .expect("query_typed")[0]
        .get(0)
}

/// The least of a few timings: the one least disturbed by the machine's other work.
async fn least<F: AsyncFnMut()>(mut f: F) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        f().await;
        best = best.min(t.elapsed());
    }
    best
}

#[tokio::test]
async fn a_query_waits_for_both_hops_each_way_and_a_pipelined_pair_waits_once() {
    let emu = start("em_net_rtt", 2, |c| c.client_latency(L).upstream_latency(L)).await;
    let c = client(&emu, "em_net_rtt").await;
    assert_eq!(typed(&c, 1).await, 1); // warm: the database connection is open
    let single = least(async || assert_eq!(typed(&c, 2).await, 2)).await;
    // Client to proxy and back, proxy to database and back.
    assert!(
        single >= 4 * L,
        "a round trip took {single:?}, less than 2 × {L:?} to the proxy plus 2 × {L:?} to the database"
    );
    assert!(
        single < 4 * L + 3 * L,
        "a round trip took {single:?}, far more than 4 × {L:?}"
    );
    // tokio-postgres pipelines concurrent requests on one client: one round trip, not two.
    let pair = least(async || {
        let (a, b) = tokio::join!(typed(&c, 3), typed(&c, 4));
        assert_eq!((a, b), (3, 4));
    })
    .await;
    assert!(
        pair.as_secs_f64() < 1.5 * single.as_secs_f64(),
        "a pipelined pair took {pair:?}, a single query {single:?}: the hops serialized it"
    );
}

#[tokio::test]
async fn zero_latency_adds_nothing() {
    let emu = start("em_net_zero", 2, |c| c).await;
    let c = client(&emu, "em_net_zero").await;
    typed(&c, 1).await;
    let single = least(async || {
        typed(&c, 2).await;
    })
    .await;
    assert!(single < L, "a round trip without latency took {single:?}");
}

/// Raw protocol: a startup message, then reads until `n` ReadyForQuery messages came;
/// returns when each came.
async fn ready_times(s: &mut tokio::net::TcpStream, buf: &mut BytesMut, n: usize) -> Vec<Instant> {
    let mut at = Vec::new();
    while at.len() < n {
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let tag = buf[0];
            buf.advance(1 + len);
            if tag == b'Z' {
                at.push(Instant::now());
            }
        }
        if at.len() == n {
            break;
        }
        let got = tokio::time::timeout(Duration::from_secs(20), s.read_buf(buf))
            .await
            .expect("the emulator answers")
            .unwrap();
        assert!(got > 0, "the emulator closed the connection");
    }
    at
}

#[tokio::test]
async fn a_chunk_is_not_held_up_by_an_earlier_one_in_flight() {
    // Two queries sent about 10 ms apart, in two chunks: on a delay line the second answer
    // comes four latencies after the second query was sent, as the first does; a hop that
    // waited its latency after each chunk it delivered would hold the second back by almost
    // a whole latency more.
    let l = Duration::from_millis(100);
    let gap = Duration::from_millis(10);
    let emu = start("em_net_line", 2, |c| {
        c.client_latency(l).upstream_latency(l)
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(emu.addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "postgres"), ("database", "postgres")],
        &mut out,
    )
    .unwrap();
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    ready_times(&mut s, &mut buf, 1).await;
    let query = |sql: &str| {
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut out).unwrap();
        out
    };
    // Warm: the database connection is open.
    s.write_all(&query("SELECT 0")).await.unwrap();
    ready_times(&mut s, &mut buf, 1).await;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let sent = Instant::now();
        s.write_all(&query("SELECT 1")).await.unwrap();
        tokio::time::sleep(gap).await;
        let second = Instant::now();
        s.write_all(&query("SELECT 2")).await.unwrap();
        let at = ready_times(&mut s, &mut buf, 2).await;
        assert!(
            at[0] - sent >= 4 * l,
            "the first answer came after {:?}",
            at[0] - sent
        );
        assert!(at[1] - second >= 4 * l, "{:?}", at[1] - second);
        best = best.min(at[1] - second);
    }
    assert!(
        best < 4 * l + l / 2,
        "the second answer came {best:?} after its query was sent: held up behind the first"
    );
}

#[tokio::test]
async fn round_trips_count_one_per_wait_for_the_proxy() {
    for latency in [Duration::ZERO, Duration::from_millis(20)] {
        let app = format!("em_net_count_{}", latency.as_millis());
        let emu = start(&app, 2, |c| {
            c.client_latency(latency).upstream_latency(latency)
        })
        .await;
        let tracked = emu.track_round_trips(&app);
        let c = client(&emu, &app).await;
        let total = emu.counters().round_trips;
        assert_eq!(tracked.get(), 1, "a login without TLS is one round trip");
        assert_eq!(total, 1, "{latency:?}");

        let before = tracked.get();
        typed(&c, 1).await;
        assert_eq!(
            tracked.get() - before,
            1,
            "query_typed: Parse/Bind/Execute/Sync in one batch ({latency:?})"
        );

        let before = tracked.get();
        let rows = c.query("SELECT $1::int4", &[&7i32]).await.unwrap();
        assert_eq!(
            tracked.get() - before,
            2,
            "query(&str): prepare, then bind and execute ({latency:?})"
        );
        // The statement's Close goes out unawaited when the rows drop: not a round trip.
        // Given time to be answered on its own, before the next query.
        let before = tracked.get();
        drop(rows);
        tokio::time::sleep(Duration::from_millis(50) + 4 * latency).await;
        typed(&c, 2).await;
        assert_eq!(tracked.get() - before, 1, "{latency:?}");

        // Pipelined requests: one round trip when they leave together.
        if !latency.is_zero() {
            let before = tracked.get();
            let (a, b) = tokio::join!(typed(&c, 3), typed(&c, 4));
            assert_eq!((a, b), (3, 4));
            assert_eq!(tracked.get() - before, 1, "a pipelined pair ({latency:?})");
        }

        // Another application's sessions are not counted under this name.
        let other = client(&emu, "someone_else").await;
        let before = tracked.get();
        typed(&other, 5).await;
        assert_eq!(tracked.get(), before);
        // query_typed, query, query_typed, the pair (with latency), the other's login and query.
        let pair = u64::from(!latency.is_zero());
        assert_eq!(emu.counters().round_trips, total + 1 + 2 + 1 + pair + 2);
    }
}
