//! The `/metrics` HTTP endpoint of mdagent and mdserver: a small HTTP/1.1 server that
//! answers `GET /metrics` (and `HEAD`) with the text a render function produces, 405
//! for another method on `/metrics`, 404 for every other path.
//!
//! Bounded: at most [`Limits::max_connections`] connections at once (one more is closed
//! at accept), a request head must arrive within [`Limits::header_timeout`], and a
//! connection lives at most [`Limits::connection_timeout`]. Plain HTTP on purpose:
//! metrics carry no secrets (names of arrays and devices, counts and timings).
//!
//! The server calls a render function for each scrape, which encodes in the [`Format`]
//! the scraper asked for (OpenMetrics when its `Accept` names
//! `application/openmetrics-text`, else the Prometheus text format 0.0.4);
//! [`registry_render`] makes one from a `prometheus-client` registry, [`encode`] is the
//! encoding itself (for tests).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The exposition format a scrape asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (curl, promtool, older scrapers).
    Text,
    /// OpenMetrics 1.0 text (Prometheus asks for it first).
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header value asks for.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Renders every metric in a format (called once per scrape).
pub type Render = Arc<dyn Fn(Format) -> String + Send + Sync>;

/// Encodes `registry` in `format`.
pub fn encode(registry: &prometheus_client::registry::Registry, format: Format) -> String {
    let mut out = String::new();
    let r = match format {
        Format::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, registry),
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry),
    };
    if let Err(e) = r {
        // Writing into a String fails only if an encoder refuses a value.
        tracing::error!("encoding the metrics failed: {e}");
    }
    out
}

/// The render function of `registry` for [`serve`].
pub fn registry_render(registry: prometheus_client::registry::Registry) -> Render {
    let registry = Arc::new(registry);
    Arc::new(move |f| encode(&registry, f))
}

/// The bounds of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; one more is closed at accept.
    pub max_connections: usize,
    /// Time for a request head to arrive.
    pub header_timeout: Duration,
    /// Longest life of a connection (keep-alive included).
    pub connection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(60),
        }
    }
}

/// Binding the metrics address failed.
#[derive(Debug, thiserror::Error)]
#[error("bind the metrics endpoint on {addr}: {source}; give a free address with --metrics-listen")]
pub struct BindError {
    /// The address asked for.
    pub addr: String,
    /// The cause.
    pub source: std::io::Error,
}

/// Binds `addr` (e.g. `0.0.0.0:9481`).
pub async fn bind(addr: &str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        addr: addr.to_owned(),
        source,
    })
}

/// Serves `/metrics` on `listener` until `shutdown` completes; open connections are
/// closed then.
pub async fn serve(
    listener: TcpListener,
    render: Render,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like: back off a little instead of spinning.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, max = limits.max_connections, "metrics endpoint: too many connections, closing one");
            drop(stream);
            continue;
        };
        let render = Arc::clone(&render);
        conns.spawn(async move {
            let _permit = permit;
            connection(stream, peer, render, limits).await;
        });
    }
    conns.shutdown().await;
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    render: Render,
    limits: Limits,
) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let render = Arc::clone(&render);
        async move { Ok::<_, Infallible>(answer(&req, &render)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(16 << 10)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.connection_timeout, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, "metrics endpoint: connection ended: {e}"),
        Err(_) => {
            tracing::debug!(%peer, "metrics endpoint: connection closed after {:?}", limits.connection_timeout)
        }
    }
}

fn answer<B>(req: &Request<B>, render: &Render) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: only /metrics is served\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: GET /metrics\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let format = Format::from_accept(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let body = render(format);
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(format.content_type()),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(limits: Limits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Render = Arc::new(|f| match f {
            Format::Text => "m 1\n".to_owned(),
            Format::OpenMetrics => "m 1\n# EOF\n".to_owned(),
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(serve(listener, render, limits, async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    /// Sends `request` and reads until the server closes (bounded); a connection reset
    /// reads as what arrived before it.
    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut out = Vec::new();
        if s.write_all(request.as_bytes()).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
                .await
                .expect("the server answers and closes within 10 s");
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn serves_metrics_in_the_asked_format_and_nothing_else() {
        let (addr, _stop) = start(Limits::default()).await;
        let r = exchange(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("text/plain; version=0.0.4"), "{r}");
        assert!(r.ends_with("\r\n\r\nm 1\n"), "{r}");
        let r = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\nConnection: close\r\n\r\n").await;
        assert!(r.contains("application/openmetrics-text"), "{r}");
        assert!(r.ends_with("# EOF\n"), "{r}");
        let r = exchange(
            addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = exchange(
            addr,
            "GET /metricsx HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = exchange(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        assert!(r.contains("allow: GET, HEAD"), "{r}");
    }

    #[tokio::test]
    async fn a_slow_request_head_is_cut_off() {
        let (addr, _stop) = start(Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let t0 = std::time::Instant::now();
        let mut buf = Vec::new();
        // Closed (EOF, or a reset) rather than left open: read_to_end returns.
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("the server closes a connection whose head does not arrive");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_a_slot_frees_again() {
        let (addr, _stop) = start(Limits {
            max_connections: 2,
            header_timeout: Duration::from_secs(30),
            ..Limits::default()
        })
        .await;
        // Two idle connections hold both slots.
        let _a = TcpStream::connect(addr).await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        // Let the server accept both before the third.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = exchange(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(r, "", "a third connection is closed without an answer");
        drop(b);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = exchange(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }

    #[tokio::test]
    async fn connections_live_at_most_the_connection_timeout() {
        let (addr, _stop) = start(Limits {
            connection_timeout: Duration::from_millis(500),
            ..Limits::default()
        })
        .await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Keep-alive requests, one after another, until the server closes.
        let t0 = std::time::Instant::now();
        let mut buf = vec![0u8; 4096];
        let closed = loop {
            if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_err()
            {
                break true;
            }
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => {}
                Err(_) => break false,
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "never closed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(closed);
        assert!(
            t0.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t0.elapsed()
        );
    }
}
