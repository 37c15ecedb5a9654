//! The closed-loop harness W3 measures every server with: pcx, its floors and its peers
//! (Redis, PostgreSQL) get the same clients, so their figures differ only by the server.

use std::future::Future;
use std::time::Instant;

use anyhow::{anyhow, Context as _, Result};

/// Runs `requests[c]` as client `c`'s requests, each client sending its next request only
/// after the answer to the previous; gives the seconds all of them took and every latency (ms).
///
/// The clients are tasks on one thread of their own (like a Python worker pool behind one
/// event loop) rather than one thread each: on this 2-core machine 64 client threads spent more
/// CPU on being scheduled than the server spent serving, which measured the harness. Every
/// request is built by the caller before the clock starts, and every connection is open before
/// it starts too (a PostgreSQL connection forks a backend, which is not what is measured); each
/// latency runs from the request's write to its answer.
///
/// `connect(c)` opens client `c`'s connection; `send` sends one request on it and waits for the
/// answer, failing on any answer that is not a success. The connection is passed by value and
/// handed back, so `send` can be a plain closure that borrows nothing.
pub(crate) fn drive<Conn, Req, Connect, Opened, Send, Answered>(
    requests: Vec<Vec<Req>>,
    connect: Connect,
    send: Send,
) -> Result<(f64, Vec<f64>)>
where
    Conn: std::marker::Send + 'static,
    Req: std::marker::Send + 'static,
    Connect: Fn(usize) -> Opened,
    Opened: Future<Output = Result<Conn>>,
    Send: Fn(Conn, Req) -> Answered + Copy + std::marker::Send + 'static,
    Answered: Future<Output = Result<Conn>> + std::marker::Send,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut conns = Vec::with_capacity(requests.len());
        for c in 0..requests.len() {
            conns.push(
                connect(c)
                    .await
                    .with_context(|| format!("client {c}: connecting"))?,
            );
        }
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (c, (mut conn, reqs)) in conns.into_iter().zip(requests).enumerate() {
            tasks.spawn(async move {
                let mut lat = Vec::with_capacity(reqs.len());
                for r in reqs {
                    let t = Instant::now();
                    conn = send(conn, r).await.with_context(|| format!("client {c}"))?;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok::<Vec<f64>, anyhow::Error>(lat)
            });
        }
        let mut all = Vec::new();
        while let Some(done) = tasks.join_next().await {
            all.extend(done.map_err(|e| anyhow!("a client task failed: {e}"))??);
        }
        Ok((start.elapsed().as_secs_f64(), all))
    })
}

/// The `p` quantile (0–1) of `v`, the nearest rank; NaN when `v` is empty.
pub(crate) fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}
